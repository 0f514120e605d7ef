"""The parts of ``bench/pipeline.py``, the end-to-end pipeline benchmark.

* :mod:`photos`: the uploaded photos and the known face of the stand-ins.
* :mod:`stand_ins`: the null and random-production networks, installed in the benchmark's workers only.
* :mod:`stack`: the engines, the worker and web processes, and the registered ensemble.
* :mod:`measure`: uploads, settling, per-stage latency, sustained throughput with CPU and transactions.
* :mod:`bounds`: the networks alone on pre-decoded photos, the bound the pipeline is compared with.
* :mod:`tables`: the printed tables and the JSON rows for ``bench/gpu.sh``.
"""

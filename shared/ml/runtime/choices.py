"""The runtimes a CPU worker may run its networks in, by name (torch-free: the settings read it).

``auto`` is, for each network, the fastest runtime that passed the accuracy check in ``bench/runtimes.py`` (the
figures and the decision are in docs/performance.md, "The networks at the best CPU runtime"). A CUDA device
always runs torch.
"""
from __future__ import annotations

import importlib.util

# eager: PyTorch fp32, channels-last. compile: the same through torch.compile. onnx: ONNX Runtime's CPU
# execution provider, fp32. onnx-int8: ONNX Runtime with int8 weights and activations (static QDQ, per-channel
# weights, activation ranges calibrated on the network's own calibration inputs). onnx-int8-dynamic: int8 weights,
# activations quantized per call (no calibration).
CPU_RUNTIMES = ("eager", "compile", "onnx", "onnx-int8", "onnx-int8-dynamic")
RUNTIME_CHOICES = ("auto", *CPU_RUNTIMES)
# What ``auto`` means on a CPU, by network: the fastest runtime whose outputs stayed within the tolerance against
# eager fp32 (descriptors at cosine >= 0.999; the top 10 of the ranking unchanged) at the workers' batches, in
# bench/runtimes.py. int8 changed the regional nets' top 10 (on random-init nets, whose 216 scores are nearly
# equal); ONNX Runtime fp32 passed everywhere, so it is also the choice for a network not measured.
AUTO_CPU_RUNTIME = {"encoder": "onnx-int8", "regions": "onnx"}
AUTO_OTHER = "onnx"
ONNX_RUNTIMES = ("onnx", "onnx-int8", "onnx-int8-dynamic")


class RuntimeUnavailable(RuntimeError):
    """A runtime whose package is not installed, or that cannot run this module."""


def resolve_runtime(name: str, device_type: str, network: str | None = None) -> str:
    """The runtime ``name`` stands for on a device of ``device_type`` ("cpu", "cuda"): CUDA always runs torch
    ("compile" stays compile, anything else is eager); on the CPU ``auto`` becomes the network's entry of
    :data:`AUTO_CPU_RUNTIME` ("encoder", "regions"), or :data:`AUTO_OTHER`.

    Raises:
        ValueError: ``name`` is not one of :data:`RUNTIME_CHOICES` (the message names them).
    """
    if name not in RUNTIME_CHOICES:
        raise ValueError(f"unknown runtime {name!r}; use one of {', '.join(RUNTIME_CHOICES)}")
    if device_type != "cpu":
        return "compile" if name == "compile" else "eager"
    return AUTO_CPU_RUNTIME.get(network or "", AUTO_OTHER) if name == "auto" else name


def check_runtime(name: str, device_type: str) -> str:
    """What ``name`` stands for on ``device_type`` (per network for ``auto``), after checking that its package is
    installed (for a worker's start: no torch is imported).

    Raises:
        ValueError: an unknown name. RuntimeUnavailable: ONNX Runtime is not installed.
    """
    resolved = {network: resolve_runtime(name, device_type, network) for network in AUTO_CPU_RUNTIME}
    needs_onnx = sorted({r for r in resolved.values() if r in ONNX_RUNTIMES})
    if needs_onnx and importlib.util.find_spec("onnxruntime") is None:
        raise RuntimeUnavailable(f"runtime {', '.join(needs_onnx)} (GESTALT_CPU_RUNTIME={name}) needs the "
                                 "onnxruntime package (pip install onnxruntime), or set GESTALT_CPU_RUNTIME=eager")
    return ", ".join(f"{network} {runtime}" for network, runtime in resolved.items())

"""The batch work behind the pipeline's stages; :mod:`worker.pipeline` runs them as detect -> align -> infer.

* :mod:`~worker.stages.resources`: this process's models, I/O threads and decode cache, made on first use.
* :mod:`~worker.stages.claims`: which photos a batch holds, entering a stage under a claim, releasing it.
* :mod:`~worker.stages.detection`: detection of a claimed batch, its faces and rejections in one transaction.
* :mod:`~worker.stages.alignment`: landmarks, quality gate and crops of a batch, stored in one transaction.
* :mod:`~worker.stages.scoring`: one forward pass over a batch, and its scores and rankings written.
"""

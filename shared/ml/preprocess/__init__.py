"""A photo to its aligned face: decode (the upload gate), detect, landmarks, quality gate, alignment, region
crops, the identity encoder's face chip and facial measurements.

:class:`Preprocessor` (``pipeline``) runs the whole chain; the workers run its steps on batches. ``cache`` keeps
the results on disk for ``gestalt train`` and ``gestalt evaluate``.
"""
from shared.ml import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "Preprocessor": "pipeline", "Preprocessed": "pipeline", "Detection": "pipeline",
    "ImageRejected": "imaging", "DecodedImage": "imaging", "decode_upload": "imaging", "decode_stored": "imaging",
    "REGIONS": "regions", "DEFAULT_REGIONS": "regions", "crop_regions": "regions",
    "CANVAS": "alignment", "face_chip": "facechip", "PrepCache": "cache",
})

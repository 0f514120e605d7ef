"""Saliency: where on the face a model found evidence for a syndrome, drawn over the aligned face."""
from shared.ml import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"heatmap_png": "saliency", "region_maps": "saliency"})

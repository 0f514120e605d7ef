"""Formats, numpy only: the production weight files and their hashes, feature vectors as stored bytes, and a
model's scores as a ranking (what the portal shows without torch)."""
from shared.ml import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "WeightsMissing": "weights", "sha256_of": "weights", "search_dirs": "weights",
    "pack": "vectors", "unpack": "vectors", "rank": "ranking",
})

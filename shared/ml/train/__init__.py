"""Training: labelled folders (``data``), subject-disjoint splits, the prepared photos (``prepared``), the
training modes and label maps (``modes``), the recipe, the loop, identity pretraining, heads on cached
features, fitting the members, synthetic warps, and ``checkpoint``, which every save and load goes through."""
from shared.ml import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "TrainConfig": "recipe", "PreparedData": "prepared", "prepare": "prepared", "train_ensemble": "loop",
    "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "subject_split": "splits",
    "load_samples": "data", "apply_label_map": "modes", "data_hash": "prepared",
})

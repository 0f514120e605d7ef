"""How a network runs: the device (``auto`` picks CUDA when there is one), the precision (bf16 autocast), and
whether a precision would be slow on this CPU."""
from shared.ml import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "resolve_device": "device", "autocast_context": "device", "slow_precision": "device", "PRECISIONS": "device",
})

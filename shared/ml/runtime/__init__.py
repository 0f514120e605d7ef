"""How a network runs: the device (``auto`` picks CUDA when there is one), the precision (bf16 autocast), whether a
precision would be slow on this CPU, and the runtime (PyTorch eager or compiled, ONNX Runtime in fp32 or int8)
behind one runner interface: a module and its input shape in, numpy out."""
from shared.ml import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "resolve_device": "device", "autocast_context": "device", "slow_precision": "device", "PRECISIONS": "device",
    "create_runner": "runners", "InputSpec": "runners", "Runner": "runners", "RuntimeUnavailable": "choices",
    "RUNTIME_CHOICES": "choices", "resolve_runtime": "choices", "check_runtime": "choices",
})

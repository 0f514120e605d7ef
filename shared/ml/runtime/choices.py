"""The runtimes a CPU worker may run its networks in, by name (torch-free: the settings read it).

``auto`` is the fastest runtime that passed the accuracy check in ``bench/runtimes.py`` (the figures and the
decision are in docs/performance.md, "The networks at the best CPU runtime"). A CUDA device always runs torch.
"""
from __future__ import annotations

import importlib.util

# eager: PyTorch fp32, channels-last. compile: the same through torch.compile. onnx: ONNX Runtime's CPU
# execution provider, fp32. onnx-int8: ONNX Runtime with int8 weights and activations (static QDQ, per-channel
# weights, activation ranges calibrated on the network's own calibration inputs). onnx-int8-dynamic: int8 weights,
# activations quantized per call (no calibration).
CPU_RUNTIMES = ("eager", "compile", "onnx", "onnx-int8", "onnx-int8-dynamic")
RUNTIME_CHOICES = ("auto", *CPU_RUNTIMES)
# What ``auto`` means on a CPU: the fastest runtime whose outputs stayed within the tolerance (rankings unchanged,
# descriptors at cosine >= 0.999 against eager fp32) at every batch the workers use, in bench/runtimes.py.
AUTO_CPU_RUNTIME = "onnx-int8"
ONNX_RUNTIMES = ("onnx", "onnx-int8", "onnx-int8-dynamic")


class RuntimeUnavailable(RuntimeError):
    """A runtime whose package is not installed, or that cannot run this module."""


def resolve_runtime(name: str, device_type: str) -> str:
    """The runtime ``name`` stands for on a device of ``device_type`` ("cpu", "cuda"): CUDA always runs torch
    ("compile" stays compile, anything else is eager); on the CPU ``auto`` becomes :data:`AUTO_CPU_RUNTIME`.

    Raises:
        ValueError: ``name`` is not one of :data:`RUNTIME_CHOICES` (the message names them).
    """
    if name not in RUNTIME_CHOICES:
        raise ValueError(f"unknown runtime {name!r}; use one of {', '.join(RUNTIME_CHOICES)}")
    if device_type != "cpu":
        return "compile" if name == "compile" else "eager"
    return AUTO_CPU_RUNTIME if name == "auto" else name


def check_runtime(name: str, device_type: str) -> str:
    """The runtime ``name`` stands for on ``device_type``, after checking that its package is installed (for a
    worker's start: no torch is imported).

    Raises:
        ValueError: an unknown name. RuntimeUnavailable: ONNX Runtime is not installed.
    """
    resolved = resolve_runtime(name, device_type)
    if resolved in ONNX_RUNTIMES and importlib.util.find_spec("onnxruntime") is None:
        raise RuntimeUnavailable(f"runtime {resolved} (GESTALT_CPU_RUNTIME={name}) needs the onnxruntime package "
                                 "(pip install onnxruntime), or set GESTALT_CPU_RUNTIME=eager")
    return resolved

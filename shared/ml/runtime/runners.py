"""Runners: one network, one runtime, numpy out.

A runner is built from any ``nn.Module`` whose input is one float32 tensor of a fixed per-item shape and a
dynamic batch (:class:`InputSpec`), and whose output is a tensor or a tuple of tensors. Calling it with a batch
(a numpy array or a torch tensor, on any device) returns the outputs as a tuple of float32 numpy arrays, whatever
ran them: PyTorch eager or ``torch.compile`` (with the device's precision: bf16 autocast on CUDA), or an ONNX
Runtime session (fp32 or int8, see :mod:`shared.ml.runtime.onnx`). A CUDA device always runs torch.

    runner = create_runner(encoder, InputSpec((3, 150, 150)), "auto", calibration=chips)
    (descriptors,) = runner(batch)
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shared.ml.runtime.choices import ONNX_RUNTIMES, resolve_runtime
from shared.ml.runtime.device import autocast_context
from shared.ml.runtime.onnx import INPUT_NAME, build, require_onnxruntime, session

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputSpec:
    """One item's input shape (without the batch dimension); the batch is dynamic. The input is float32."""

    shape: tuple[int, ...]


class Runner:
    """Calls a network on a batch and returns its outputs as float32 numpy arrays."""

    runtime: str = ""
    spec: InputSpec

    def __call__(self, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def check(self, x: np.ndarray | torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.spec.shape:
            raise ValueError(f"{self.runtime} runner: expected inputs N x {' x '.join(map(str, self.spec.shape))}, "
                             f"got {' x '.join(map(str, x.shape))}")


class TorchRunner(Runner):
    """PyTorch eager or ``torch.compile`` on the module's device, in inference mode, with ``precision``'s autocast
    (:func:`shared.ml.runtime.device.autocast_context`: "auto" is bf16 on CUDA and fp32 on the CPU)."""

    def __init__(self, module: nn.Module, spec: InputSpec, runtime: str = "eager", precision: str = "auto",
                 channels_last: bool = False):
        """
        Args:
            channels_last: hand 4-d inputs to the module in NHWC (for a module whose weights are channels-last
                and that does not convert its input itself).
        """
        self.module = module.eval()
        self.channels_last = channels_last
        self.spec = spec
        self.runtime = runtime
        self.precision = precision
        self.device = next(module.parameters()).device
        # One graph for every batch size (a worker's batches vary from 1 to GESTALT_INFER_BATCH, twice that with
        # flip TTA): compiled once, where static shapes would compile again for each new size.
        self.forward = torch.compile(module, dynamic=True) if runtime == "compile" else module

    def __call__(self, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, ...]:
        self.check(x)
        x = (torch.from_numpy(x) if isinstance(x, np.ndarray) else x).to(self.device, torch.float32,
                                                                           non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast_context(self.device, self.precision):
            out = self.forward(x)
        out = out if isinstance(out, tuple | list) else (out,)
        return tuple(o.float().cpu().numpy() for o in out)


class OnnxRunner(Runner):
    """An ONNX Runtime session: fp32 (``onnx``) or int8 (``onnx-int8``, ``onnx-int8-dynamic``)."""

    def __init__(self, model: bytes, spec: InputSpec, runtime: str, threads: int,
                 provider: str = "CPUExecutionProvider"):
        self.spec = spec
        self.runtime = runtime
        self.provider = provider
        self.session = session(model, threads, provider)

    def __call__(self, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, ...]:
        self.check(x)
        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return tuple(self.session.run(None, {INPUT_NAME: np.ascontiguousarray(x, np.float32)}))


def create_runner(module: nn.Module, spec: InputSpec, runtime: str = "auto", precision: str = "auto",
                  calibration: np.ndarray | torch.Tensor | None = None, cache_dir: str | os.PathLike | None = None,
                  threads: int | None = None, provider: str = "CPUExecutionProvider",
                  channels_last: bool = False, network: str | None = None) -> Runner:
    """A runner of ``module`` in ``runtime`` (see :data:`shared.ml.runtime.choices.RUNTIME_CHOICES`).

    Args:
        module: the network, on its device; a module on CUDA always runs in torch (eager or compile).
        spec: one item's input shape.
        runtime: a name of ``RUNTIME_CHOICES``; "auto" is the fastest that passed the accuracy check.
        precision: torch's autocast precision ("auto", "fp32", "bf16"); the ONNX runtimes ignore it.
        calibration: typical inputs (``N x spec.shape``), required by ``onnx-int8`` to set activation ranges.
        cache_dir: where exported ONNX models are kept by the weights' hash; None exports in memory.
        threads: ONNX Runtime's intra-op threads; None follows ``torch.get_num_threads()`` (the worker's share).
        provider: ONNX Runtime's execution provider (``CUDAExecutionProvider`` for the GPU bench's row).
        channels_last: torch runtimes: hand 4-d inputs over in NHWC (see :class:`TorchRunner`).
        network: which of ``AUTO_CPU_RUNTIME``'s networks this is ("encoder", "regions"), for what "auto" means.

    Raises:
        ValueError: an unknown runtime, or ``onnx-int8`` without calibration inputs.
        shared.ml.runtime.choices.RuntimeUnavailable: the runtime's package is missing.
    """
    device = next(module.parameters()).device
    name = resolve_runtime(runtime, "cpu" if provider != "CPUExecutionProvider" else device.type, network)
    if name not in ONNX_RUNTIMES:
        return TorchRunner(module, spec, name, precision, channels_last)
    require_onnxruntime()
    if isinstance(calibration, torch.Tensor):
        calibration = calibration.detach().cpu().numpy()
    if name == "onnx-int8" and (calibration is None or not len(calibration)):
        raise ValueError(f"runtime onnx-int8 needs calibration inputs for {type(module).__name__}")
    cpu_copy = module if device.type == "cpu" else _cpu_copy(module)
    model = build(cpu_copy, spec.shape, name, calibration, cache_dir)
    return OnnxRunner(model, spec, name, threads or torch.get_num_threads(), provider)


def _cpu_copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module).to("cpu", torch.float32)


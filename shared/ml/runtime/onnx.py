"""A torch module as an ONNX Runtime session: export, int8 quantisation and a cache keyed by the weights.

The module is exported by torch's ONNX exporter (``torch.export`` based) with a dynamic batch dimension, then,
for the int8 runtimes, quantised by ONNX Runtime's quantizer: ``onnx-int8`` statically (QDQ, int8 weights per
output channel, uint8 activations whose ranges are calibrated on the inputs the caller passes), and
``onnx-int8-dynamic`` with int8 weights and activations quantised per call. The result is kept in a cache
folder under a key made of the weights, the input shape, the runtime, the calibration inputs and the versions of
torch and ONNX Runtime, so a worker exports a network once per machine, not once per process start.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.ml.runtime.choices import RuntimeUnavailable

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
INPUT_NAME = "x"
# Exported with a batch of this many items: torch.export specialises a dimension of size 1.
EXPORT_BATCH = 2


def require_onnxruntime():
    """The ``onnxruntime`` module, or a :class:`RuntimeUnavailable` that says what to install."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeUnavailable("the ONNX Runtime runtimes need the onnxruntime package (pip install onnxruntime); "
                                 "or set GESTALT_CPU_RUNTIME=eager") from exc
    return onnxruntime


def module_digest(module: nn.Module) -> str:
    """sha256 over the module's class, parameter and buffer names and their float32 bytes."""
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(module: nn.Module, shape: tuple[int, ...], runtime: str, calibration: np.ndarray | None) -> str:
    import onnxruntime

    h = hashlib.sha256(f"{CACHE_FORMAT}|{runtime}|{shape}|{torch.__version__}|{onnxruntime.__version__}".encode())
    h.update(module_digest(module).encode())
    if calibration is not None:
        h.update(np.ascontiguousarray(calibration, np.float32).tobytes())
    return h.hexdigest()


def export(module: nn.Module, shape: tuple[int, ...]) -> bytes:
    """The ONNX model of ``module`` (in eval mode, on the CPU) for inputs ``batch x shape``, batch dynamic."""
    import onnx

    module = module.eval()
    example = torch.zeros((EXPORT_BATCH, *shape))
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.onnx.export(module, (example,), dynamo=True, verbose=False, input_names=[INPUT_NAME],
                                dynamic_shapes=({0: batch},))
    if program is None:
        raise RuntimeUnavailable(f"torch's ONNX exporter returned no model for {type(module).__name__}")
    return onnx.ModelProto.SerializeToString(program.model_proto)


def quantize(model: bytes, runtime: str, calibration: np.ndarray | None) -> bytes:
    """``model`` with int8 weights (and, for ``onnx-int8``, int8 activations calibrated on ``calibration``)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="gestalt-quant-") as tmp:
        source, prepared, target = Path(tmp, "fp32.onnx"), Path(tmp, "prepared.onnx"), Path(tmp, "int8.onnx")
        source.write_bytes(model)
        quant_pre_process(str(source), str(prepared))  # shape inference and graph fusions, as the quantizer asks
        if runtime == "onnx-int8":
            if calibration is None or not len(calibration):
                raise ValueError("onnx-int8 needs calibration inputs (the network's typical inputs)")
            quantize_static(str(prepared), str(target), _reader(CalibrationDataReader, calibration),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=output_nodes(prepared))
        elif runtime == "onnx-int8-dynamic":
            quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8, per_channel=True)
        else:
            raise ValueError(f"no quantisation for runtime {runtime!r}")
        return target.read_bytes()


# Ops that compute (and end the walk back from an output); the ops between them and the output only move data.
_COMPUTE = {"Conv", "Gemm", "MatMul"}


def output_nodes(path: Path) -> list[str]:
    """The nodes from each graph output back to (and including) the last convolution or matrix product before it.

    They stay in float: an output quantised with ranges calibrated on a few faces clips what other faces reach.
    (The identity encoder's descriptors on the shared people photos: cosine to fp32 at least 0.9994 with the final
    layer in float, 0.996 with it quantised.)"""
    import onnx

    graph = onnx.load(str(path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    names: list[str] = []
    frontier = [o.name for o in graph.output]
    while frontier:
        node = producer.get(frontier.pop())
        if node is None or node.name in names:
            continue
        names.append(node.name)
        if node.op_type not in _COMPUTE:
            frontier += [i for i in node.input if i in producer]
    return names


def _reader(base: type, inputs: np.ndarray):
    """ONNX Runtime's calibration reader over an array of inputs, one item per call."""

    class Reader(base):
        def __init__(self):
            self._items = iter(np.ascontiguousarray(inputs, np.float32)[:, None])

        def get_next(self) -> dict | None:
            item = next(self._items, None)
            return None if item is None else {INPUT_NAME: item}

    return Reader()


def build(module: nn.Module, shape: tuple[int, ...], runtime: str, calibration: np.ndarray | None = None,
          cache_dir: str | os.PathLike | None = None) -> bytes:
    """The ONNX model for ``runtime`` ("onnx", "onnx-int8", "onnx-int8-dynamic"): from ``cache_dir`` when it
    holds one for these weights, else exported (the int8 ones quantised from the fp32 export, itself cached) and,
    with a ``cache_dir``, written there."""
    key = cache_key(module, shape, runtime, calibration if runtime == "onnx-int8" else None)
    path = Path(cache_dir) / f"{type(module).__name__}-{runtime}-{key[:24]}.onnx" if cache_dir else None
    if path is not None and path.is_file():
        return path.read_bytes()
    start = time.monotonic()
    if runtime == "onnx":
        model = export(module, shape)
    else:
        model = quantize(build(module, shape, "onnx", None, cache_dir), runtime, calibration)
    logger.info("network=%s runtime=%s state=built seconds=%.1f", type(module).__name__, runtime,
                time.monotonic() - start)
    if path is not None:
        _write(path, model)
    return model


def _write(path: Path, data: bytes) -> None:
    """Write beside ``path`` and rename, so that a process reading the cache never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False) as tmp:
            tmp.write(data)
        os.chmod(tmp.name, 0o644)
        os.replace(tmp.name, path)
    except OSError as exc:
        logger.warning("could not cache %s: %s", path, exc)


def session(model: bytes, threads: int, provider: str = "CPUExecutionProvider"):
    """An ONNX Runtime session of ``model`` on ``threads`` intra-op threads (no spinning between calls: a worker's
    processes share the cores, and a spinning thread takes them from its neighbours)."""
    ort = require_onnxruntime()
    if provider not in ort.get_available_providers():
        raise RuntimeUnavailable(f"ONNX Runtime's {provider} is not available here "
                                 f"(available: {', '.join(ort.get_available_providers())})")
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=[provider])

"""dlib's serialisation of a deep network, read in pure Python/numpy (no dlib needed).

The face-identity encoder (:mod:`shared.ml.nets.encoder`) reads ``dlib_face_recognition_resnet_model_v1.dat``
with :func:`read_dlib_network` and converts the layers it returns into PyTorch weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# dlib writes a network with its own ``serialize`` overloads (dlib/serialize.h and the layer
# classes of dlib/dnn): an integer is one byte holding its length in bytes (low four bits) and
# its sign (0x80), then the magnitude, little-endian; a float is two integers, mantissa and
# base-2 exponent; a string is its length then its bytes; a bool is the character '0' or '1';
# a tensor is the version 2, four dimensions, then raw little-endian float32 values.
#
# A network nests: each layer writes its version, then the whole network below it, then its
# own details. The file therefore holds the loss layer, then one version per layer from the
# output down to the input (1 for tag and skip layers, which write nothing else; 2 for a
# layer; 3 for the first layer, which holds the input layer), then the input layer, then each
# layer's details from the input up, each followed by three bools and three (empty) tensors
# of training state, plus one integer for the first layer.


class FormatError(ValueError):
    """The file is not the dlib network this module ports."""


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise FormatError(f"unexpected end of file at byte {self.pos}")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        head = self.take(1)[0]
        size = head & 0x0F
        if size > 8 or head & 0x70:
            raise FormatError(f"not a dlib integer at byte {self.pos - 1} (0x{head:02x})")
        value = int.from_bytes(self.take(size), "little")
        return -value if head & 0x80 else value

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        special = {32000: np.inf, 32001: -np.inf, 32002: np.nan}  # dlib's float_details codes
        return float(special[exponent]) if exponent in special else float(np.ldexp(float(mantissa), exponent))

    def str(self) -> str:
        return self.take(self.int()).decode("ascii")

    def bool(self) -> bool:
        c = self.take(1)
        if c not in (b"0", b"1"):
            raise FormatError(f"not a dlib bool at byte {self.pos - 1}")
        return c == b"1"

    def tensor(self) -> np.ndarray:
        version = self.int()
        if version != 2:
            raise FormatError(f"tensor version {version} at byte {self.pos}; only version 2 is read")
        shape = tuple(self.int() for _ in range(4))
        count = int(np.prod(shape))
        return np.frombuffer(self.take(4 * count), dtype="<f4").reshape(shape)

    def alias(self) -> tuple[int, int, int, int]:
        """An ``alias_tensor``: its version, then its shape (a view into the layer's params)."""
        self.int()
        return tuple(self.int() for _ in range(4))


@dataclass
class Layer:
    kind: str  # dlib's layer name, e.g. "con_4", "affine_"; "tag" for tag and skip layers
    fields: dict = field(default_factory=dict)


def _read_details(r: _Reader) -> Layer:
    name = r.str()
    if name == "con_4":
        params = r.tensor()
        num_filters, nr, nc, stride_y, stride_x, pad_y, pad_x = (r.int() for _ in range(7))
        filters, biases = r.alias(), r.alias()
        for _ in range(4):  # learning-rate and weight-decay multipliers
            r.float()
        n = int(np.prod(filters))
        flat = params.reshape(-1)
        if flat.size != n + biases[1] or biases[1] != num_filters:
            raise FormatError(f"con_4: {flat.size} parameters for filters {filters} and {num_filters} biases")
        return Layer(name, {"weight": flat[:n].reshape(filters), "bias": flat[n:], "kernel": (nr, nc),
                            "stride": (stride_y, stride_x), "padding": (pad_y, pad_x)})
    if name == "affine_":
        params = r.tensor().reshape(-1)
        gamma, beta = r.alias(), r.alias()
        mode = r.int()
        k = int(np.prod(gamma))
        if mode != 0 or params.size != k + int(np.prod(beta)):
            raise FormatError(f"affine_: mode {mode} with {params.size} parameters")
        return Layer(name, {"gamma": params[:k], "beta": params[k:]})
    if name in ("max_pool_2", "avg_pool_2"):
        nr, nc, stride_y, stride_x, pad_y, pad_x = (r.int() for _ in range(6))
        return Layer(name, {"window": (nr, nc), "stride": (stride_y, stride_x), "padding": (pad_y, pad_x)})
    if name in ("relu_", "add_prev_"):
        return Layer(name)
    if name == "fc_2":
        num_outputs, num_inputs = r.int(), r.int()
        params = r.tensor()
        weights, _biases = r.alias(), r.alias()
        bias_mode = r.int()
        for _ in range(4):
            r.float()
        if weights[:2] != (num_inputs, num_outputs) or bias_mode != 1:
            raise FormatError(f"fc_2: weights {weights}, bias mode {bias_mode}; expected no bias")
        w = params.reshape(-1)[:num_inputs * num_outputs].reshape(num_inputs, num_outputs)
        return Layer(name, {"weight": w})  # dlib computes x @ w
    raise FormatError(f"unknown dlib layer {name!r}")


def read_dlib_network(data: bytes) -> tuple[dict, list[Layer]]:
    """Parse a serialised dlib network into (input layer fields, layers from the input up).

    The loss layer is read and checked (``loss_metric_2``); tag and skip layers appear as
    ``Layer("tag")`` in their place.
    """
    r = _Reader(data)
    if r.int() != 1 or r.str() != "loss_metric_2":
        raise FormatError("not a dlib metric-learning network (loss_metric_2)")
    r.float(), r.float()  # margin, distance threshold
    versions = []
    while True:
        v = r.int()
        if v not in (1, 2, 3):
            raise FormatError(f"unexpected layer version {v}")
        versions.append(v)
        if v == 3:
            break
        if len(versions) > 10_000:
            raise FormatError("no input layer found")
    if r.str() != "input_rgb_image_sized":
        raise FormatError("the network does not take input_rgb_image_sized")
    input_layer = {"mean": (r.float(), r.float(), r.float()), "size": (r.int(), r.int())}
    layers = []
    for v in reversed(versions):
        if v == 1:
            layers.append(Layer("tag"))
            continue
        layer = _read_details(r)
        for _ in range(3):  # setup done, gradient stale, output disabled
            r.bool()
        for _ in range(3):  # training state: gradients and cached outputs
            r.tensor()
        if v == 3:
            r.int()  # sample expansion factor
        layers.append(layer)
    if r.pos != len(data):
        raise FormatError(f"{len(data) - r.pos} bytes left after the network")
    return input_layer, layers


def resnet_layer_sequence(stages: tuple[tuple[int, int, bool], ...]) -> list[tuple[str, dict]]:
    """The layer sequence of a dlib ResNet of ``stages`` ((channels, blocks, downsamples), as dlib's face network
    is built), from the input side, with what to check of each layer."""
    seq: list[tuple[str, dict]] = [("con_4", {"kernel": (7, 7), "stride": (2, 2), "padding": (0, 0)}),
                                   ("affine_", {}), ("relu_", {}),
                                   ("max_pool_2", {"window": (3, 3), "stride": (2, 2), "padding": (0, 0)})]
    for _channels, count, down in stages:
        for i in range(count):
            d = down and i == 0
            conv1 = {"kernel": (3, 3), "stride": (2, 2) if d else (1, 1), "padding": (0, 0) if d else (1, 1)}
            conv2 = {"kernel": (3, 3), "stride": (1, 1), "padding": (1, 1)}
            seq += [("tag", {}), ("con_4", conv1), ("affine_", {}), ("relu_", {}), ("con_4", conv2), ("affine_", {})]
            if d:
                seq += [("tag", {}), ("tag", {}),
                        ("avg_pool_2", {"window": (2, 2), "stride": (2, 2), "padding": (0, 0)})]
            seq += [("add_prev_", {}), ("relu_", {})]
    seq += [("avg_pool_2", {"window": (0, 0), "stride": (1, 1), "padding": (0, 0)}), ("fc_2", {})]
    return seq


def fold_affine(conv: Layer, affine: Layer) -> tuple[np.ndarray, np.ndarray]:
    """``gamma * (W x + b) + beta`` as one convolution, computed in float64."""
    g = affine.fields["gamma"].astype(np.float64)
    w = conv.fields["weight"].astype(np.float64) * g[:, None, None, None]
    b = conv.fields["bias"].astype(np.float64) * g + affine.fields["beta"].astype(np.float64)
    return w.astype(np.float32), b.astype(np.float32)

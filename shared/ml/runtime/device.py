"""Where and in what precision a network runs: the device, bf16 autocast, and when bf16 would be slow."""
from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


PRECISIONS = ("auto", "fp32", "bf16")


def slow_precision(device: torch.device, precision: str) -> str | None:
    """Why ``precision`` would be slow on ``device``, or None. bf16 autocast on a CPU without native bf16
    (AVX512-BF16 or AMX) is emulated: about 10x slower than fp32 there ("auto" picks fp32 on the CPU)."""
    if precision != "bf16" or device.type != "cpu":
        return None
    native = [getattr(torch.cpu, probe, lambda: True)() for probe in ("_is_avx512_bf16_supported",
                                                                       "_is_amx_tile_supported")]
    if any(native):
        return None
    return ("GESTALT_INFER_PRECISION=bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) is emulated and "
            "about 10x slower than fp32; use auto or fp32")


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast for ``precision`` "bf16", or "auto" on CUDA; otherwise no autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

"""atheris fuzzing of the upload gate: any input either decodes or raises ImageRejected.

python tests/fuzz_decode.py -runs=100000      (libFuzzer flags)
"""
from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from shared.ml.preprocess.imaging import ImageRejected, decode_upload

from tests.hostile_corpus import corpus  # noqa: E402

LIMITS = {"max_bytes": 2 * 2**20, "max_pixels": 4e6, "min_side": 8}
SEEDS = [v for v in corpus().values() if 0 < len(v) < 200_000]


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    # Mutate real seeds as well as raw bytes, so the fuzzer reaches the decoders quickly.
    if SEEDS and fdp.ConsumeBool():
        seed = bytearray(SEEDS[fdp.ConsumeIntInRange(0, len(SEEDS) - 1)])
        for _ in range(fdp.ConsumeIntInRange(1, 16)):
            if not seed:
                break
            seed[fdp.ConsumeIntInRange(0, len(seed) - 1)] = fdp.ConsumeInt(1) & 0xFF
        payload = bytes(seed[: fdp.ConsumeIntInRange(0, len(seed))])
    else:
        payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        decoded = decode_upload(payload, **LIMITS)
    except ImageRejected as exc:
        assert exc.reason and 400 <= exc.http_status < 500
        return
    assert decoded.rgb.ndim == 3 and decoded.rgb.shape[2] == 3 and decoded.data


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

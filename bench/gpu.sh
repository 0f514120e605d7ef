#!/usr/bin/env bash
# One prepared GPU check (issue 18): the CUDA rows of bench/preprocess.py (RetinaFace-R50 + FAN,
# random weights unless the real files are present) and of bench/inference.py, then
# bench/pipeline.py with a GPU worker consuming detect, align and infer (production networks
# with random weights, their outputs replaced by the photo's known face) plus a CPU worker
# for the default queue, and the same with null networks (the plumbing ceiling on that box).
# Then bench/runtimes.py on CUDA: the encoder and the regional nets in PyTorch fp32 and bf16, and in ONNX Runtime's
# CUDA execution provider when onnxruntime-gpu is installed (a row says "skipped" otherwise).
# Writes one markdown table to $OUT/gpu.md when $OUT is set, else to stdout; logs go to stderr.
#
# Budget: under 8 minutes on one H100/H200 with 16 cores. Each step has its own time limit,
# and a step that fails or times out leaves a row saying so instead of stopping the rest.
#
# Usage: bench/gpu.sh            (on a machine with CUDA)
#        bench/gpu.sh --cpu-smoke (tiny sizes on the CPU, under 2 minutes: proves the script works)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
ROWS=$(mktemp -t gestalt-gpu-rows.XXXXXX)
trap 'rm -f "$ROWS"' EXIT
START=$(date +%s)

step() {  # step NAME SECONDS command...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)" >&2
    timeout --kill-after=10 "$limit" "$@" 1>&2
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "{\"bench\": \"$name\", \"what\": \"step failed (exit $rc after $((SECONDS - t0)) s)\", \"value\": \"-\", \"unit\": \"\"}" >>"$ROWS"
    fi
    echo "== $name: exit $rc in $((SECONDS - t0)) s" >&2
}

if [ $SMOKE = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""
    DEV=cpu
    step preprocess 60 "$PY" bench/preprocess.py --backends production --devices cpu --batches 2 --photos 2 \
        --repeat 1 --megapixels 0.05 --rows "$ROWS"
    step inference 40 "$PY" bench/inference.py --devices cpu --batches 1,8 --min-time 0.02 --width 0.125 \
        --classes 8 --compile no --rows "$ROWS"
    step encoder 30 "$PY" bench/encoder.py --devices cpu --batches 1,4 --min-time 0.05 --rows "$ROWS"
    step runtimes 150 "$PY" bench/runtimes.py --networks regions --width 0.125 --classes 8 --batches 1,2 --rounds 1 \
        --repeat 1 --photos 4 --runtimes eager,onnx --no-mediapipe --rows "$ROWS"
    step pipeline 90 "$PY" bench/pipeline.py --models random-production --device cpu --concurrency 1 --uploads 2 \
        --single 0 --classes 8 --kind casia --width 0.125 --megapixels 0.15 --preload --no-bound --rows "$ROWS"
else
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "CUDA is not available here; run bench/gpu.sh --cpu-smoke on a CPU-only machine" >&2
        exit 2
    fi
    DEV=cuda
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >&2 || true
    step preprocess 120 "$PY" bench/preprocess.py --backends production --devices cuda --batches 1,32,256 \
        --photos 64 --repeat 3 --rows "$ROWS"
    step inference 110 "$PY" bench/inference.py --devices cuda --batches 64,1024,4096 --min-time 0.5 --compile no \
        --rows "$ROWS"
    step encoder 40 "$PY" bench/encoder.py --devices cuda --batches 1,64,1024 --min-time 0.3 --rows "$ROWS"
    step runtimes 90 "$PY" bench/runtimes.py --device cuda --networks encoder,regions --batches 1,64 --rounds 3 \
        --repeat 1 --photos 32 --rows "$ROWS"
    step pipeline 150 "$PY" bench/pipeline.py --models random-production --device cuda --gpu-procs 2 \
        --uploads 2000 --single 5 --classes 216 --preload --web-workers 8 --upload-threads 16 --rows "$ROWS"
    step pipeline-null 60 "$PY" bench/pipeline.py --models null --device cuda --gpu-procs 2 \
        --uploads 1000 --single 0 --classes 216 --preload --web-workers 8 --upload-threads 16 --rows "$ROWS"
fi

DEST=/dev/stdout
[ -n "${OUT:-}" ] && mkdir -p "$OUT" && DEST=$OUT/gpu.md
"$PY" - "$ROWS" "$DEV" "$(( $(date +%s) - START ))" >"$DEST" <<'PYEOF'
import json, platform, sys

rows_file, device, seconds = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    import torch
    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
except Exception:  # noqa: BLE001
    name = device
print(f"| bench | measurement ({device}: {name}; whole check {seconds} s) | value | unit | note |")
print("|---|---|---|---|---|")
for line in open(rows_file):
    r = json.loads(line)
    print(f"| {r['bench']} | {r['what']} | {r['value']} | {r['unit']} | {r.get('note', '')} |")
PYEOF

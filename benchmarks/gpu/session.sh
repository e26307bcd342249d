#!/usr/bin/env bash
# One GPU session for the work that waits on a GPU (issue 6), sized for one 10-minute device call:
#   1. the GPU tests (tests/test_gpu.py: every plugin with the pipeline on CUDA, `bench run` with run.device = cuda);
#   2. Stable Signature's extractor at the official architecture / optimiser / batch, for SS_SECONDS
#      (benchmarks/stable_signature_extractor.py; writes extractor.safetensors for `extractor_path`);
#   3. AquaLoRA's PPFT capacity at 48 bits towards the paper's sample count (benchmarks/aqualora_ppft_bits.py,
#      at most PPFT_STEPS steps at batch 12, within PPFT_SECONDS).
# Prepare first (here): bash benchmarks/gpu/prepare.sh. Then, on the device, with .gpu carried:
#     bash benchmarks/gpu/session.sh            # everything lands in $OUT (or /tmp/markbench-gpu)
# Budgets (seconds): SS_SECONDS (default 180), PPFT_SECONDS (150), TESTS_SECONDS (90); about 8 minutes in all.
# DEVICE (cuda), SS_ARGS and PPFT_ARGS (extra arguments, appended: the last one wins) let it be smoke-run on a CPU
# with tiny settings (tests/test_cli.py checks that it parses), e.g.
#     DEVICE=cpu SS_SECONDS=1 PPFT_SECONDS=1 SS_ARGS="--model micro-sd --covers 8 --held-out 4 --image-size 16 \
#     --batch 4 --encoder 1x4 --decoder 1x4" PPFT_ARGS="--model micro-sd --train-images 4 --eval-captions 2 \
#     --bits 4 --rank 4" bash benchmarks/gpu/session.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/markbench-gpu}"
mkdir -p "$OUT"
SS_SECONDS="${SS_SECONDS:-180}"
PPFT_SECONDS="${PPFT_SECONDS:-150}"
PPFT_STEPS="${PPFT_STEPS:-25000}"
TESTS_SECONDS="${TESTS_SECONDS:-90}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
SS_ARGS="${SS_ARGS:-}"
PPFT_ARGS="${PPFT_ARGS:-}"

if [ -f .gpu/site.tar.xz ]; then
    mkdir -p /tmp/markbench-site && tar -C /tmp/markbench-site -xJf .gpu/site.tar.xz || exit 1
    export PYTHONPATH="/tmp/markbench-site:${PWD}${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 MARKBENCH_HOME="${MARKBENCH_HOME:-/tmp/markbench-home}"
nvidia-smi -L || true
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')" 2>&1 | tee "$OUT/versions.txt"

echo "== 1. GPU tests"
timeout "$TESTS_SECONDS" "$PY" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 \
    | tail -40 | tee "$OUT/gpu_tests.log"

echo "== 2. Stable Signature extractor (${SS_SECONDS} s of training)"
timeout $((SS_SECONDS + 150)) "$PY" benchmarks/stable_signature_extractor.py --device "$DEVICE" \
    --seconds "$SS_SECONDS" --cover-cache /tmp/markbench-covers.pt --out "$OUT/extractor.safetensors" \
    --json "$OUT/extractor.json" $SS_ARGS 2>&1 | grep -v "it/s\]" | tail -5 | tee "$OUT/extractor.log"

echo "== 3. AquaLoRA PPFT, 48 bits (${PPFT_SECONDS} s, at most ${PPFT_STEPS} steps at batch 12)"
timeout $((PPFT_SECONDS + 150)) "$PY" benchmarks/aqualora_ppft_bits.py --device "$DEVICE" --bits 48 --rank 96 \
    --batch 12 --steps "$PPFT_STEPS" --seconds "$PPFT_SECONDS" --messages 8 $PPFT_ARGS 2>&1 | grep -v "it/s\]" | tail -12 \
    | tee "$OUT/ppft.log"
ls -l "$OUT"

#!/usr/bin/env bash
# One GPU session for the work that waits on a GPU (issue 6), sized for one 10-minute device call:
#   1. the GPU tests (tests/test_gpu.py: every plugin with the pipeline on CUDA, `bench run` with run.device = cuda);
#   2. Stable Signature's extractor at the official architecture / optimiser / batch, for SS_SECONDS of training
#      (experiments/stable_signature_extractor.py; writes extractor.safetensors for `extractor_path`);
#   3. AquaLoRA's PPFT capacity at 48 bits towards the paper's sample count (experiments/aqualora_ppft_bits.py,
#      at most PPFT_STEPS steps at batch 12, within PPFT_SECONDS of training).
# Prepare first (here): bash benchmarks/gpu/prepare.sh. Then, on the device, with .gpu carried:
#     bash benchmarks/gpu/session.sh            # logs and the extractor land in $OUT (or /tmp/markbench-gpu)
# Budgets (seconds): TESTS_SECONDS (default 100), SS_SECONDS (150), PPFT_SECONDS (120) of training; each step also
# generates its data and evaluates. Every step's timeout is capped by one deadline, TOTAL_SECONDS (540) after the
# start, so the whole run ends inside the device's 600 s command limit with its logs written. $OUT/status.txt
# holds each step's exit code; the script exits non-zero if any step failed.
# DEVICE (cuda), SS_ARGS and PPFT_ARGS (extra arguments, appended: the last one wins) let it be smoke-run on a CPU
# with tiny settings (tests/test_cli.py checks that it parses), e.g.
#     DEVICE=cpu SS_SECONDS=1 PPFT_SECONDS=1 SS_ARGS="--model micro-sd --covers 8 --held-out 4 --image-size 16 \
#     --batch 4 --encoder 1x4 --decoder 1x4" PPFT_ARGS="--model micro-sd --train-images 4 --eval-captions 2 \
#     --bits 4 --rank 4" bash benchmarks/gpu/session.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS
OUT="${OUT:-/tmp/markbench-gpu}"
mkdir -p "$OUT"
TOTAL_SECONDS="${TOTAL_SECONDS:-540}"
TESTS_SECONDS="${TESTS_SECONDS:-100}"
SS_SECONDS="${SS_SECONDS:-150}"
PPFT_SECONDS="${PPFT_SECONDS:-120}"
PPFT_STEPS="${PPFT_STEPS:-25000}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
SS_ARGS="${SS_ARGS:-}"
PPFT_ARGS="${PPFT_ARGS:-}"
failed=0

if [ -f .gpu/site.tar.xz ]; then
    mkdir -p /tmp/markbench-site && tar -C /tmp/markbench-site -xJf .gpu/site.tar.xz || exit 1
    export PYTHONPATH="/tmp/markbench-site:${PWD}${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 MARKBENCH_HOME="${MARKBENCH_HOME:-/tmp/markbench-home}"
nvidia-smi -L 2>/dev/null || true
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')" 2>&1 | tee "$OUT/versions.txt"
: > "$OUT/status.txt"

# step NAME BUDGET LOG COMMAND...: run COMMAND with the smaller of BUDGET and the time left before the deadline;
# the whole output goes to $OUT/LOG, its end to the terminal; the exit code to status.txt.
step() {
    local name="$1" budget="$2" log="$3"
    shift 3
    local left=$((TOTAL_SECONDS - (SECONDS - start)))
    [ "$budget" -gt "$left" ] && budget="$left"
    if [ "$budget" -le 5 ]; then
        echo "$name: skipped (no time left)" | tee -a "$OUT/status.txt"
        failed=1
        return
    fi
    echo "== $name (at most ${budget} s)"
    timeout "$budget" "$@" > "$OUT/$log" 2>&1
    local rc=$?
    grep -v "it/s\]" "$OUT/$log" | tail -25
    echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/status.txt"
    [ "$rc" -eq 0 ] || failed=1
}

per_test=()  # pytest-timeout (on the device image) names a hanging test instead of losing the whole step
"$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 60)
step "1. GPU tests" "$TESTS_SECONDS" gpu_tests.log \
    "$PY" -m pytest -m gpu tests/test_gpu.py -q -rfEs -p no:cacheprovider "${per_test[@]}"
step "2. Stable Signature extractor" $((SS_SECONDS + 90)) extractor.log \
    "$PY" experiments/stable_signature_extractor.py --device "$DEVICE" --seconds "$SS_SECONDS" \
    --cover-cache /tmp/markbench-covers.pt --out "$OUT/extractor.safetensors" --json "$OUT/extractor.json" $SS_ARGS
step "3. AquaLoRA PPFT, 48 bits" $((PPFT_SECONDS + 90)) ppft.log \
    "$PY" experiments/aqualora_ppft_bits.py --device "$DEVICE" --bits 48 --rank 96 --batch 12 \
    --steps "$PPFT_STEPS" --seconds "$PPFT_SECONDS" --messages 8 $PPFT_ARGS
ls -l "$OUT"
exit "$failed"

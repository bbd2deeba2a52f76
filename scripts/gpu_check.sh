#!/usr/bin/env bash
# The GPU measurements of docs/RESULTS.md and docs/BENCHMARKS.md in one run, on one CUDA GPU: the
# CUDA-only tests, the quality target's 5-minute training run with the Tester and the error
# regions, and the generation benchmark.
#
#     bash scripts/gpu_check.sh                 # logs and results under out/gpu_check
#     OUT=/some/dir LR=5e-4 bash scripts/gpu_check.sh
#
# Uses the python3 on PATH as it is (no virtual environment: a GPU machine brings its own CUDA
# build of torch). Each step's output goes to its own log; a failed step does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_check}"
DR="${DR:-data/dance}"
LR="${LR:-1e-3}"
TRAIN_S="${TRAIN_S:-300}"  # the training run's limit, start-up included
RUN="$OUT/run"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { echo "== $1 ($(date +%T))"; }
# A failed step shows the end of its log, so the one output of a device call says what went wrong.
failed() { echo "-- exit status $1; the end of $2:"; tail -5 "$2"; }

step "device"
python3 - <<'PY' 2>&1 | tee "$OUT/device.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0))
PY

step "CUDA-only tests"
if python3 -c "import pytest" 2>/dev/null; then
    python3 -m pytest -q tests/test_model.py -k cuda 2>&1 | tail -5 | tee "$OUT/tests.txt"
else
    echo "pytest is not installed here: CUDA tests not run" | tee "$OUT/tests.txt"
fi

step "dataset"
[[ -f "$DR/dataset.json" ]] || python3 scripts/make_dance_data.py --out "$DR" > "$OUT/data.log" 2>&1

# The quality target's setting (docs/RESULTS.md): first-frame conditioning at the lab's dims, with
# the first pose, the warp and the pose match; SIGINT at the time limit (the Trainer saves and stops).
# Validation every 2 epochs (a few seconds each on a GPU in this mode): if the time limit comes
# before epoch 30, best.ckpt is at most 2 epochs behind.
step "training, $TRAIN_S s"
timeout -s INT "$TRAIN_S" python3 Trainer.py --DR "$DR" --save_root "$RUN" --overwrite \
    --condition first --residual --first_frame_from video --train_vi_len 4 --batch_size 64 \
    --lr "$LR" --scheduler cosine --warmup_epochs 1 --min_lr 1e-5 --kl_anneal_type Full_KL \
    --num_epoch 30 --val_every 2 --per_save 100 --compile off \
    --first_pose --warp --pose_flow --warp_loss 1 > "$OUT/train.log" 2>&1
rc=$?
tr '\r' '\n' < "$OUT/train.log" | grep -a -E "^ *epoch [0-9]+/[0-9]+ \||val PSNR|Stopped|Done" | tail -40
[[ $rc -eq 0 || $rc -eq 124 ]] || failed $rc "$OUT/train.log"
# best.ckpt is written at the first validation; a run stopped before it leaves last.ckpt only.
CKPT="$RUN/best.ckpt"
[[ -f "$CKPT" ]] || CKPT="$RUN/last.ckpt"

step "Tester"
echo "checkpoint: $CKPT"
python3 Tester.py --ckpt_path "$CKPT" --DR "$DR" --save_root "$RUN/test" > "$OUT/test.log" 2>&1 \
    && tail -12 "$OUT/test.log" || failed $? "$OUT/test.log"

step "error regions"
python3 scripts/error_regions.py --DR "$DR" --ckpt_path "$CKPT" > "$OUT/regions.log" 2>&1 \
    && tail -8 "$OUT/regions.log" || failed $? "$OUT/regions.log"

# Generation of 5 x 630 frames: the lab's model with the step as the Tester runs it (eager, captured
# in a CUDA graph), then compiled before the capture; and the quality run's model, whose frames
# are generated in batches (no frame reads another under --condition first), its training step
# timed with the warp loss it trains with.
step "generation benchmark"
i=0
for extra in "" "--compile_gen" "--condition first --residual --first_pose --warp --pose_flow --warp_loss 1"; do
    i=$((i + 1))
    python3 scripts/bench.py --device cuda --skip_eager --compile off --batch_size 8 --steps 2 \
        --warmup 1 --json $extra 2>"$OUT/bench$i.err" | tee -a "$OUT/bench.jsonl" || failed $? "$OUT/bench$i.err"
done
step "done"

#!/usr/bin/env bash
# Issue 10 item 4 in one GPU session: the recipes not yet measured on the GPU, 3 seeds each, the
# same 224 px store, model selection on valid and the test split read once per run (bench/accuracy.py).
# Run from the repo root on the device (one `run` call, carry [".device"]):
#   bash bench/gpu_recipes.sh                                   # the session, about 9 minutes on an H200
#   SMOKE=1 DEVICE=cpu STORE=outputs/processed96 bash bench/gpu_recipes.sh   # a rehearsal on the CPU
# Expects .device/wheels/*.whl (../shared/device/wheelhouse.sh), .device/store224.txz
# (tar cJf .device/store224.txz -C outputs processed: a 224 px store, data.on_leak = "keep") and
# .device/store64.txz (tar cJf .device/store64.txz -C outputs processed64: `ctscan preprocess -s
# resnet18-scratch`).
# The recipes run in the order issue 10 needs them; each has its own timeout (a percentage of
# LIMIT seconds), so a slow one costs itself only. bench/accuracy.py writes each recipe's JSON to
# $OUT after every seed (partial figures survive a timeout); the tables go to $OUT/summary.txt.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-outputs/gpu-recipes}
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
STORE=${STORE:-outputs/processed}
STORE64=${STORE64:-outputs/processed64}
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/summary.txt"; }

# shellcheck source=bench/_device_setup.sh
source "$(dirname "$0")/_device_setup.sh"
stamp "setup done"

RUNS=outputs/gpu-recipes-runs  # the run folders stay on the device (not in $OUT: too large)
if [ "$SMOKE" = 1 ]; then
  SEEDS=(0); LIMIT=600; RUNS=$OUT/runs  # a rehearsal on a busy CPU, its runs under $OUT
  SHORT=(--set train.epochs=1 --set train.batch_size=16)
else
  SEEDS=(0 1 2); LIMIT=70; SHORT=()  # 7 recipes, at most 469 s after setup: a call may run 600
fi
size_of() { python3 -c "import json; print(json.load(open('$1/meta.json'))['spec']['image_size'])"; }
# every recipe reads $STORE at its image size unless it names $STORE64 (later --set wins)
COMMON=(--seeds "${SEEDS[@]}" --set "paths.processed_dir=\"$STORE\"" --set "data.image_size=$(size_of "$STORE")"
  --set 'train.compile="off"'
  --set train.quiet=true --set tracking.enabled=false --set "train.device=\"$DEVICE\"")

# recipe PERCENT NAME BASE [--set key=value ...]: bench/accuracy.py on BASE with the overrides,
# for at most PERCENT % of LIMIT seconds.
recipe() {
  local limit=$(( $1 * LIMIT / 100 )) name=$2 base=$3
  shift 3
  stamp "$name"
  timeout "$limit" python3 bench/accuracy.py --recipes "$base" "${COMMON[@]}" "$@" "${SHORT[@]}" \
    --runs-dir "$RUNS/$name" --out "$OUT/$name.json" \
    2> "$OUT/$name.log" | tail -n 3 | tee -a "$OUT/summary.txt"
}

# EfficientNet-Lite0 from ImageNet weights (0.958 +- 0.007 measured with every stage trained,
# before the head-initialisation fix of 2026-11-28: the base recipe first, measured again).
recipe 100 effnet-base efficientnet_lite0-cuda
recipe 100 effnet-frozen3 efficientnet_lite0-cuda --set model.frozen_stages=3
recipe 150 effnet-60ep efficientnet_lite0-cuda --set train.epochs=60
recipe 100 effnet-mixup efficientnet_lite0-cuda --set augment.mixup_alpha=0.2
# From scratch: 64 px beat 224 px on the CPU (resnet18 0.884 +- 0.029 vs 0.651 +- 0.104 on this
# GPU at 224 px and 60 epochs): the 64 px recipes again on the GPU, and resnet18 at 224 px with the
# same 40 epochs, which isolates the image size.
AT64=(--set "paths.processed_dir=\"$STORE64\"" --set "data.image_size=$(size_of "$STORE64")")
recipe 60 resnet18-scratch64 resnet18-scratch "${AT64[@]}"
recipe 60 cnn-scratch64 cnn-scratch "${AT64[@]}"
recipe 100 resnet18-scratch224 resnet18-scratch  # COMMON: $STORE at its size (224)
stamp "done"

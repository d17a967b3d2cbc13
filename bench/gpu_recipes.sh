#!/usr/bin/env bash
# Issue 10 item 4 in one GPU session: the recipes not yet measured on the GPU, 3 seeds each, the
# same 224 px store, model selection on valid and the test split read once per run (bench/accuracy.py).
# Run from the repo root on the device (one `run` call, carry [".device"]):
#   bash bench/gpu_recipes.sh                                   # the session, about 9 minutes on an H200
#   SMOKE=1 DEVICE=cpu STORE=outputs/processed96 bash bench/gpu_recipes.sh   # a rehearsal on the CPU
# Expects .device/wheels/*.whl (../shared/device/wheelhouse.sh) and .device/store224.txz
# (tar cJf .device/store224.txz -C outputs processed: a 224 px store, data.on_leak = "keep").
# The recipes run in the order issue 10 needs them; each has its own timeout (a percentage of
# LIMIT seconds), so a slow one costs itself only. bench/accuracy.py writes each recipe's JSON to
# $OUT after every seed (partial figures survive a timeout); the tables go to $OUT/summary.txt.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-outputs/gpu-recipes}
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
STORE=${STORE:-outputs/processed}
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/summary.txt"; }

# shellcheck source=bench/_device_setup.sh
source "$(dirname "$0")/_device_setup.sh"
stamp "setup done"

if [ "$SMOKE" = 1 ]; then
  SEEDS=(0); LIMIT=300
  SHORT=(--set train.epochs=1 --set train.batch_size=16 --set "data.image_size=$(python3 -c "import json; print(json.load(open('$STORE/meta.json'))['spec']['image_size'])")")
else
  SEEDS=(0 1 2); LIMIT=70; SHORT=()  # 7 recipes, at most 546 s after setup: a call may run 600
fi
COMMON=(--seeds "${SEEDS[@]}" --set "paths.processed_dir=\"$STORE\"" --set 'train.compile="off"'
  --set train.quiet=true --set tracking.enabled=false --set "train.device=\"$DEVICE\"")

# recipe PERCENT NAME BASE [--set key=value ...]: bench/accuracy.py on BASE with the overrides,
# for at most PERCENT % of LIMIT seconds.
recipe() {
  local limit=$(( $1 * LIMIT / 100 )) name=$2 base=$3
  shift 3
  stamp "$name"
  timeout "$limit" python3 bench/accuracy.py --recipes "$base" "${COMMON[@]}" "$@" "${SHORT[@]}" \
    --runs-dir "outputs/gpu-recipes-runs/$name" --out "$OUT/$name.json" \
    2> "$OUT/$name.log" | tail -n 3 | tee -a "$OUT/summary.txt"
}

# EfficientNet-Lite0 from ImageNet weights (0.958 +- 0.007 measured with every stage trained,
# before the head-initialisation fix of 2026-11-28: the base recipe first, measured again).
recipe 100 effnet-base efficientnet_lite0-cuda
recipe 100 effnet-frozen3 efficientnet_lite0-cuda --set model.frozen_stages=3
recipe 150 effnet-60ep efficientnet_lite0-cuda --set train.epochs=60
recipe 100 effnet-mixup efficientnet_lite0-cuda --set augment.mixup_alpha=0.2
# From scratch (resnet18 0.651 +- 0.104, cnn 0.622 +- 0.047 measured): the small GAP head, lower
# learning rates, and early stopping on validation loss.
recipe 100 cnn_gap-scratch cnn-cuda --set 'model.name="cnn_gap"' --set model.dropout=0.2
recipe 100 resnet18-lr5e-4 resnet18-cuda --set train.lr=5e-4
recipe 130 resnet18-valloss resnet18-cuda --set 'train.select_metric="val_loss"' \
  --set train.early_stop_patience=15 --set train.epochs=100
stamp "done"

#!/usr/bin/env bash
# One GPU session, everything in one go (see docs/results.md). Run from the repo root on the device:
#   bash bench/gpu_session.sh            # full run
#   SMOKE=1 DEVICE=cpu bash bench/gpu_session.sh   # a tiny rehearsal on the CPU
# Expects .device/wheels/*.whl (../shared/device/wheelhouse.sh) and .device/store224.txz
# (tar cJf .device/store224.txz -C outputs processed, a 224 px store with on_leak=keep).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-outputs/gpu}
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

# shellcheck source=bench/_device_setup.sh
source "$(dirname "$0")/_device_setup.sh"
stamp "setup done"
python3 - <<'PY' | tee "$OUT/machine.txt"
import torch, platform
print("torch", torch.__version__, "cuda", torch.version.cuda, "python", platform.python_version())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory // 2**20, "MiB")
PY

if [ "$SMOKE" = 1 ]; then
  EPOCHS_BENCH=2; SET_FULL=(--epochs 2 --set train.batch_size=16); SEEDS=(0); ACC_SET=(--set train.epochs=1 --set train.batch_size=16)
  PREC=fp32; COMPILE=off; BATCH=16
else
  EPOCHS_BENCH=10; SET_FULL=(); SEEDS=(0 1 2); ACC_SET=(); PREC=bf16; COMPILE=on; BATCH=256
fi

# 1. Training-step throughput: ctscan train vs the synthetic ceiling, same process.
stamp "throughput"
timeout 150 python3 bench/train_bench.py --device "$DEVICE" --precision "$PREC" --batch "$BATCH" \
  --compile "$COMPILE" --epochs "$EPOCHS_BENCH" --models resnet18 --out "$OUT/train_$DEVICE.json" \
  --processed-dir "${CTSCAN_PATHS__PROCESSED_DIR:-outputs/processed}" \
  2>&1 | tail -n 5

# 2. A full 30-epoch ResNet-18 run, process start to evaluated, tracked and registered model.
stamp "full run"
start=$(date +%s.%N)
timeout 150 ctscan train -s resnet18-cuda-fast --device "$DEVICE" --out outputs/runs/full30 \
  --quiet "${SET_FULL[@]}" > "$OUT/full30.json" 2> "$OUT/full30.log"
rc=$?
end=$(date +%s.%N)
python3 -c "print('full30 rc=$rc wall_s=%.2f' % ($end - $start))" | tee "$OUT/full30_wall.txt"
tail -n 4 "$OUT/full30.log"

# 3. Accuracy: 3 recipes x seeds (eager: compiling 9 short runs costs more than it saves).
stamp "accuracy"
timeout 270 python3 bench/accuracy.py --recipes efficientnet_lite0-cuda resnet18-cuda cnn-cuda \
  --seeds "${SEEDS[@]}" --set 'train.compile="off"' --set 'train.quiet=true' \
  --set 'tracking.enabled=false' --set "train.device=\"$DEVICE\"" "${ACC_SET[@]}" \
  --out "$OUT/accuracy.json" 2> "$OUT/accuracy.log" | tail -n 8
stamp "done"

#!/usr/bin/env bash
# Train three candidate models side by side on one GPU within a time budget, then pack their weights.
#
# The training crops are augmented on the CPU (elastic deformation dominates), so the CPU cores, not the GPU,
# set the pace: a short probe measures the milliseconds per crop on this machine, and each run's schedule is
# sized so that its workers finish inside the budget. Each run is a plain `train`; nothing here changes how
# training works.
#
# Usage (on the lent GPU machine, from the project root, after ../shared/tools/device-prep here):
#   source .device/env.sh && bash scripts/gpu-sweep.sh 400              # three candidates side by side
#   source .device/env.sh && GRACE=40 bash scripts/gpu-sweep.sh 150 finetune   # a second schedule for the default
#   source .device/env.sh && GRACE=40 bash scripts/gpu-sweep.sh 330 crops      # second schedules on 256 and 384 crops
#   source .device/env.sh && GRACE=30 bash scripts/gpu-sweep.sh 270 long       # the default recipe, every core feeding it
# Results: runs/<name>/ (metrics.jsonl, curves.png, logs), and in $OUT the packed weights in float16
# (the machine returns files of at most 16 MiB): cat $OUT/sweep.tar.part* | tar -x
set -uo pipefail
budget=${1:-400}
out=${OUT:-/tmp/sweep-out}
mkdir -p "$out" runs
shared=${SHARED:-$PWD/.device/shared}
data="$shared/data/sartorius-reconstructed $shared/data/sartorius"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
nproc

read -r ms256 ms384 < <(python3 - <<'EOF'
import time
import numpy as np
from app.ml.training.augment import AugmentConfig, Example, augment

rng = np.random.default_rng(0)
side = 572
example = Example(rng.normal(size=(side, side)).astype(np.float32), rng.integers(0, 3, (side, side)).astype(np.uint8),
                  np.ones((side, side), np.float16), np.ones((side, side), np.float16))
figures = []
for crop in (256, 384):
    config = AugmentConfig(crop=crop)
    augment(example, config, rng)
    started = time.perf_counter()
    for _ in range(15):
        augment(example, config, rng)
    figures.append((time.perf_counter() - started) / 15 * 1000)
print(*(f"{f:.1f}" for f in figures))
EOF
)
echo "ms per augmented crop on one core: 256 -> $ms256, 384 -> $ms384"

# run NAME WORKERS MS_PER_CROP [train options...]: a schedule of whole 50-step epochs that fits the budget.
run() {
  local name=$1 workers=$2 ms=$3
  shift 3
  local epochs
  epochs=$(python3 -c "print(max(2, int($budget * 0.75 * $workers * 1000 / ($ms * 8) / 50)))")
  local every=$(( epochs / 8 > 0 ? epochs / 8 : 1 ))
  echo "$name: $epochs epochs of 50 steps, validation every $every"
  timeout $(( budget + ${GRACE:-90} )) python3 -m app.train --data $data --out runs --version "$name" \
    --epochs "$epochs" --epoch-size 400 --batch-size 8 --val-every "$every" --val-fraction 0.25 \
    --reference-size 520x704 --torch-threads 1 --workers "$workers" --device "${DEVICE:-cuda}" --no-tune-thresholds \
    --checkpoint-every 500 "$@" >"runs/$name.log" 2>&1 &
}

if [[ ${2:-sweep} == finetune ]]; then
  # A second schedule from the default model's weights, alone on the machine with every core feeding it.
  run finetune 14 "$ms256" --width 16 --depth 4 --crop 256 --init model_store/sartorius-w16-v3 --lr 1e-3 --warmup 0.02
elif [[ ${2:-sweep} == long ]]; then
  # The default model's recipe from scratch, alone on the machine: a longer schedule in the same time.
  run long 14 "$ms256" --width 16 --depth 4 --crop 256
elif [[ ${2:-sweep} == crops ]]; then
  # Two second schedules from the default model's weights side by side: the same crops, and larger ones that hold
  # more of an astrocyte's long processes.
  run ft256 7 "$ms256" --width 16 --depth 4 --crop 256 --init model_store/sartorius-w16-v3 --lr 1e-3 --warmup 0.02
  run ft384 7 "$ms384" --width 16 --depth 4 --crop 384 --init model_store/sartorius-w16-v3 --lr 1e-3 --warmup 0.02
else
  run w16d4 4 "$ms256" --width 16 --depth 4 --crop 256
  run w32d4 4 "$ms256" --width 32 --depth 4 --crop 256
  run w16d5 5 "$ms384" --width 16 --depth 5 --crop 384
fi
# Report the GPU's load now and then, and stop watching as soon as every run has ended (a long sleep here would
# outlast the runs and the machine's time limit).
for ((second = 1; second <= budget + ${GRACE:-90}; second++)); do
  sleep 1
  [[ -z $(jobs -r) ]] && break
  (( second % 60 == 30 )) && echo "after ${second}s: GPU busy, memory: $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"
done
wait
for log in runs/*.log; do
  echo "== $log"; grep -o "validation score [0-9.]* {[^}]*}" "$log" | tail -n 3; tail -c 400 "$log"; echo
done

# Pack: float16 copies of the last weights of every run and of the best-epoch weights of the smallest.
python3 - <<'EOF'
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file

for run in sorted(p for p in Path("runs").iterdir() if p.is_dir()):
    if not (run / "last.pt").is_file():
        print(run.name, "left no last.pt")
        continue
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["model"]
    save_file({k: v.half().contiguous() for k, v in state.items()}, run / "last-fp16.safetensors")
    for weights in run.glob("weights-*.safetensors"):
        if run.name in ("w16d4", "finetune", "ft256", "ft384", "long"):
            save_file({k: v.half() for k, v in load_file(weights).items()}, run / "best-fp16.safetensors")
        weights.unlink()
    (run / "last.pt").unlink()
    print(run.name, sorted(p.name for p in run.iterdir()))
EOF
tar -cf - runs | split -b 15M - "$out/sweep.tar.part"
ls -la "$out"

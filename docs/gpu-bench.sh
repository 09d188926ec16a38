#!/usr/bin/env bash
# The GPU serving check: `bench` on the lent GPU machine with several workers and the steps around the network on
# the GPU, then the same service with the instance step back on the CPU, each in its own JSON file.
#
# Here, from the project root (the GPU machine's image lacks these of our dependencies too):
#   DEVICE_WHEELS="$(.venv/bin/python -m pip freeze | grep -iE '^(fastapi-offline|roifile|pycocotools|imagecodecs)==' \
#     | tr '\n' ' ')" bash ../shared/tools/device-prep
# There (run with carry [".device"], a timeout of 560 s):
#   source .device/env.sh && bash docs/gpu-bench.sh
# Results in $OUT: bench-gpu.json and .log (the figures: concurrency 1 and 64, GPU busy share, memory),
# bench-gpu-resize.json and .log (CELLSEG_STEPS_ON_DEVICE=resize: the instance step on the CPU, in every worker).
set -uo pipefail
out=${OUT:-/tmp/bench-out}
mkdir -p "$out"
workers=${WORKERS:-8}
image=${CELLSEG_SHARED_DATA:-$PWD/.device/shared/data/sartorius}/test/7ae19de7bc2a.png
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
nproc

timeout 300 python3 -m app.bench --device cuda --workers "$workers" --concurrency 1 16 64 --image "$image" \
  --out "$out/bench-gpu.json" > "$out/bench-gpu.log" 2>&1
echo "steps on the device: exit $?"
tail -n 30 "$out/bench-gpu.log"

timeout 200 python3 -m app.bench --device cuda --quick --workers "$workers" --steps-on-device resize \
  --concurrency 1 64 --image "$image" --out "$out/bench-gpu-resize.json" > "$out/bench-gpu-resize.log" 2>&1
echo "instance step on the CPU: exit $?"
tail -n 12 "$out/bench-gpu-resize.log"

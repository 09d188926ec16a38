#!/usr/bin/env bash
# The GPU serving check: `bench` on the lent GPU machine as the compose file serves (8 workers, the steps around the
# network on the GPU, the instance step on the CPU in each worker), then two variants in quick runs: a worker per
# core, and the instance step on the GPU too. Each in its own JSON file.
#
# Here, from the project root (the GPU machine's image lacks these of our dependencies too):
#   DEVICE_WHEELS="$(.venv/bin/python -m pip freeze | grep -iE '^(fastapi-offline|roifile|pycocotools|imagecodecs)==' \
#     | tr '\n' ' ')" bash ../shared/tools/device-prep
# There (run with carry [".device"], a timeout of 560 s):
#   source .device/env.sh && bash docs/gpu-bench.sh
# Results in $OUT: bench-gpu.json and .log (the figures: concurrency 1 and 64, GPU busy share, memory, and
# the instance step on the GPU beside the reference), bench-gpu-16-workers.json and .log, bench-gpu-all.json and .log
# (CELLSEG_STEPS_ON_DEVICE=all).
set -uo pipefail
out=${OUT:-/tmp/bench-out}
mkdir -p "$out"
image=${CELLSEG_SHARED_DATA:-$PWD/.device/shared/data/sartorius}/test/7ae19de7bc2a.png
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
nproc

bench() {  # name, seconds, bench's arguments
    local name=$1 seconds=$2
    shift 2
    timeout "$seconds" python3 -m app.bench --device cuda --image "$image" --out "$out/$name.json" "$@" \
        > "$out/$name.log" 2>&1
    echo "$name: exit $?"
    tail -n 14 "$out/$name.log"
}

bench bench-gpu 270 --workers 8 --concurrency 1 16 64
bench bench-gpu-16-workers 130 --quick --workers 16 --concurrency 1 64
bench bench-gpu-all 130 --quick --workers 8 --steps-on-device all --concurrency 1 64

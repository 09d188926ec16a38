#!/usr/bin/env bash
# The GPU serving check: `bench` on the lent GPU machine as the compose file serves (8 workers, the steps around the
# network on the GPU, the instance step on the CPU in each worker); then whether torch.compile pays for the network
# there; then two variants of the service in quick runs: a worker per core, and the instance step on the GPU too
# (or, where the first run found it slower there, 4 test-time augmentation views).
# Each in its own files; the first holds the figures, the later ones can be cut by their time limits.
#
# Here, from the project root (the GPU machine's image lacks these of our dependencies too):
#   DEVICE_WHEELS="$(.venv/bin/python -m pip freeze | grep -iE '^(fastapi-offline|roifile|pycocotools|imagecodecs)==' \
#     | tr '\n' ' ')" bash ../shared/tools/device-prep
# There (run with carry [".device"], a timeout of 570 s):
#   source .device/env.sh && bash scripts/gpu-bench.sh
# Results in $OUT: bench-gpu.json and .log (concurrency 1 and 64, the GPU's busy share and memory, the instance step
# on the GPU beside the reference), gpu-compile.json and .log, bench-gpu-16-workers.*, and bench-gpu-all.*
# (CELLSEG_STEPS_ON_DEVICE=all) or bench-gpu-tta4.* (CELLSEG_TTA=4).
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

bench bench-gpu 240 --workers 8 --concurrency 1 16 64
timeout 80 python3 scripts/gpu_compile_check.py --out "$out/gpu-compile.json" > "$out/gpu-compile.log" 2>&1
echo "gpu-compile: exit $?"
tail -n 4 "$out/gpu-compile.log"
bench bench-gpu-16-workers 110 --quick --workers 16 --concurrency 1 64
# The instance step on the GPU for every request only where the first run found it faster there than the reference
# on a CPU core; else what 4 test-time augmentation views (0.3243 against 0.3111, docs/training.md) cost the service.
faster_on_gpu=$(python3 -c 'import json, sys; s = json.load(open(sys.argv[1]))["instance_step"]
print(int(s["torch_on_device_ms"] < s["reference_on_cpu_ms"]))' "$out/bench-gpu.json" 2>/dev/null || echo 0)
if [ "$faster_on_gpu" = 1 ]; then
    bench bench-gpu-all 110 --quick --workers 8 --steps-on-device all --concurrency 1 64
else
    bench bench-gpu-tta4 110 --quick --workers 8 --tta 4 --concurrency 1 64
fi

#!/usr/bin/env bash
# The GPU machine's entry of the whole-job benchmark (`python -m tools.gpu.gpu_job scale=full`): installs the
# wheels carried in .whl/ (made beforehand by `bash tools/gpu/gpu_wheels.sh` where PyPI is reachable), then
# runs the job under a time guard, its log and gpu_job.json in $OUT. From the repository root, with .whl carried:
#   bash tools/gpu/gpu_job.sh [overrides, e.g. steps=20 torch_adam=false]
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-job-out}
mkdir -p "$OUT"
# The job's own guard, well inside a 10-minute command: stopped, it still prints its table and keeps its figures.
LIMIT_S=${LIMIT_S:-500}
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit
# the checkout first, so that Ray's workers import it too (the project itself is not installed)
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # with torch_adam=false, DeepSpeed's JIT-built Adam: Hopper's
# The final checkpoint of d24 (~37 GB: bf16 weights, fp32 AdamW state and EMA) goes to TMPDIR and is then copied into
# the run folder under /tmp: with /dev/shm as TMPDIR when it has room, the disk holds one copy (Ray stays on /tmp).
# /dev/shm is memory: Ray's memory monitor would count the checkpoint there and could kill the worker writing it.
if [ "$(df --output=avail -B1G /dev/shm | tail -1)" -ge 48 ]; then
  export TMPDIR=/dev/shm RAY_TMPDIR=/tmp RAY_memory_monitor_refresh_ms=0
fi
echo "wheels installed in $(( $(date +%s) - start )) s; TMPDIR=${TMPDIR:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
df -h /tmp /dev/shm | sed 's/^/  /'
timeout -s INT -k 30 "$LIMIT_S" python3 -m tools.gpu.gpu_job scale=full out="$OUT" work=/tmp/gpu-job "$@" 2>&1 \
  | tee "$OUT/gpu_job.log"
echo "gpu_job.sh: $(( $(date +%s) - start )) s in all"

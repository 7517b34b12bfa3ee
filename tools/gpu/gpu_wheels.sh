#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels that the GPU machine's image lacks for `tools/gpu/gpu_job.sh`: cp312
# manylinux wheels at the versions this project is tested with (requirements/constraints.txt, else the dev venv's),
# Ray slimmed to what a one-machine job loads. Run here, where PyPI is reachable: `bash tools/gpu/gpu_wheels.sh`.
# What travels to the GPU machine (working tree and carried .whl together) must stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DEST=.whl
# The image has torch, transformers, huggingface-hub, safetensors, accelerate, peft, torchmetrics, OpenCV, pyarrow,
# pandas, numpy, pillow, aiohttp, protobuf, pyyaml, einops, ninja, psutil, py-cpuinfo, tqdm (device KINDS.md); these
# are what the job's imports need beyond it (ray[data,train,tune], deepspeed, diffusers, hydra-core and their needs).
# typing-extensions and packaging travel too: pydantic and ray want newer ones than an image may have.
WHEELS="ray diffusers hydra-core omegaconf importlib-metadata pydantic pydantic-core annotated-types typing-inspection
typing-extensions packaging hjson jsonschema jsonschema-specifications referencing rpds-py tensorboardX"
SDISTS="deepspeed antlr4-python3-runtime"  # published as source only: built here into pure-Python wheels
RAY_UNUSED="ray/jars/ ray/rllib/ ray/serve/ ray/llm/ ray/dashboard/client/"

pin() {  # NAME -> NAME==VERSION: requirements/constraints.txt's pin, else the version in the dev venv
  local version
  version=$(grep -i "^$1==" requirements/constraints.txt | cut -d= -f3 || true)
  [ -n "$version" ] || version=$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1")
  echo "$1==$version"
}

rm -rf "$DEST" && mkdir -p "$DEST"
pins=$(for name in $WHEELS; do pin "$name"; done)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" $pins
# --no-build-isolation: DeepSpeed's setup imports torch; this venv's CPU build does (no ops are compiled here)
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" $(for name in $SDISTS; do pin "$name"; done)
"$PY" -m tools.gpu.slim_wheel "$DEST"/ray-*.whl $RAY_UNUSED
ls -1 "$DEST"
du -ch "$DEST"/*.whl | tail -1

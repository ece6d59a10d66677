#!/usr/bin/env bash
# Download the wheels a bare GPU machine lacks (megatron-core, fla-core) into .whl/, for Python
# 3.12 x86-64, from the package index; carry .whl/ to the GPU machine and install them there with
# `source scripts/gpu_env.sh`. Run once on a machine with index access.
set -euo pipefail
cd "$(dirname "$0")/.."
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any; do
  plat+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" -d .whl "megatron-core==0.19.2" "fla-core==0.6.0"
ls -l .whl

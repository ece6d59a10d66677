#!/usr/bin/env bash
# Train the tiny hybrid attention/MoE model: on the GPU if there is one, else 2 CPU ranks (gloo,
# expert parallel 2). Extra arguments are passed on, e.g. --set train.train_iters=50.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=examples/configs/tiny.yaml
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  exec torchrun --standalone --nproc_per_node=1 -m sbtrain.train "$CONFIG" "$@"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc_per_node=2 -m sbtrain.train "$CONFIG" --set parallel.ep=2 "$@"

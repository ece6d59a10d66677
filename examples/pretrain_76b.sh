#!/usr/bin/env bash
"""":
# SpikingBrain-76B continual pre-training (docs/76b.md). Both launches run every stage of the
# config in order (a finished stage is skipped on a relaunch, so rerunning continues):
#
#   torchrun --nproc_per_node=N examples/pretrain_76b.sh [CONFIG] [--stage NAME] [--set k=v ...]
#   bash examples/pretrain_76b.sh [CONFIG] [--stage NAME] [--set k=v ...]
#
# CONFIG defaults to examples/configs/spikingbrain_76b_tiny.yaml; the full model is
# examples/configs/spikingbrain_76b.yaml (512 ranks). All parallel sizes come from the YAML.
# This file is both a bash and a Python script: torchrun runs it with Python on every rank
# (everything between the quote lines is a string to Python), bash runs this part, which
# launches torchrun on this same file with the world size the YAML implies (dp*pp*tp*sp,
# per stage), split over $NNODES nodes (multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT).
set -euo pipefail
SCRIPT="$0"
# sbtrain from this checkout, installed or not (the Python part below does the same)
REPO="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
CONFIG="$(dirname "$0")/configs/spikingbrain_76b_tiny.yaml"
if [[ $# -gt 0 && "$1" != --* ]]; then CONFIG=$1; shift; fi
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [[ $GPUS -eq 0 ]]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
NNODES=${NNODES:-1}
if [[ $NNODES -gt 1 ]]; then
  LAUNCH=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?}" --master_addr="${MASTER_ADDR:?}"
          --master_port="${MASTER_PORT:-29500}")
else
  LAUNCH=(--standalone)
fi
STAGES=$(python3 -m sbtrain.cli stages "$CONFIG")
if [[ " $* " == *" --stage "* ]]; then STAGES=""; fi   # the caller picked one stage
run_stage() {  # run_stage [--stage NAME] ARGS...
  local world status=0
  world=$(python3 -m sbtrain.cli world-size "$CONFIG" "$@") || status=$?
  if (( status == 3 )); then   # parallel.dp: 0 -> every GPU of each node, or 2 CPU ranks
    world=$(( (GPUS > 0 ? GPUS : 2) * NNODES ))
  elif (( status )); then
    exit "$status"
  fi
  if (( world % NNODES )); then
    echo "the YAML implies $world ranks, which do not split over NNODES=$NNODES" >&2; exit 2
  fi
  local per_node=$(( world / NNODES ))
  if (( GPUS > 0 && per_node > GPUS )); then
    echo "the YAML implies $world ranks = $per_node per node, but this node has $GPUS GPUs;" \
         "set NNODES (and NODE_RANK, MASTER_ADDR) or change the parallel section" >&2; exit 2
  fi
  echo "== $CONFIG $* : torchrun with $world ranks ($per_node per node)"
  torchrun "${LAUNCH[@]}" --nproc_per_node="$per_node" "$SCRIPT" "$CONFIG" "$@"
}
if [[ -z "$STAGES" ]]; then
  run_stage "$@"
else
  for STAGE in $STAGES; do run_stage --stage "$STAGE" "$@"; done
fi
exit 0
"""
# Python: what torchrun runs on every rank; --stage all unless a stage is named. (No double
# quotes, dollar signs or backticks below: bash -n reads this part as one quoted word.)
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's sbtrain
from sbtrain.train import ALL_STAGES, main  # noqa: E402



def _main(args: list) -> int:
    config = args.pop(0) if args and not args[0].startswith('--') else str(
        Path(__file__).resolve().parent / 'configs' / 'spikingbrain_76b_tiny.yaml')
    if '--stage' not in args:
        args += ['--stage', ALL_STAGES]
    return main([config, *args])


# The guard matters: checkpoint saving starts worker processes that import this file again.
if __name__ == '__main__':
    sys.exit(_main(sys.argv[1:]))
# "

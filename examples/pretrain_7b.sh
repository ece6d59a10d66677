#!/usr/bin/env bash
# SpikingBrain-7B continual pre-training: every stage of the config, in order, one torchrun
# launch per stage (each stage starts from the previous stage's checkpoint; a finished stage
# is skipped on a relaunch, so rerunning the script after a failure continues where it stopped).
#
#   bash examples/pretrain_7b.sh [CONFIG] [--set section.key=value ...]
#
# CONFIG defaults to the tiny variant. Ranks per node: $NPROC_PER_NODE, else every visible GPU,
# else 2 CPU ranks (gloo). Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=examples/configs/spikingbrain_7b_tiny.yaml
if [[ $# -gt 0 && "$1" != --* ]]; then CONFIG=$1; shift; fi
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
NPROC=${NPROC_PER_NODE:-$(( GPUS > 0 ? GPUS : 2 ))}
if [[ $GPUS -eq 0 ]]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
if [[ ${NNODES:-1} -gt 1 ]]; then
  LAUNCH=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?}" --master_addr="${MASTER_ADDR:?}"
          --master_port="${MASTER_PORT:-29500}")
else
  LAUNCH=(--standalone)
fi
STAGES=$(python3 -m sbtrain.cli stages "$CONFIG")
if [[ -z "$STAGES" ]]; then
  exec torchrun "${LAUNCH[@]}" --nproc_per_node="$NPROC" -m sbtrain.train "$CONFIG" "$@"
fi
for STAGE in $STAGES; do
  echo "== stage $STAGE ($CONFIG, $NPROC ranks per node)"
  torchrun "${LAUNCH[@]}" --nproc_per_node="$NPROC" -m sbtrain.train "$CONFIG" --stage "$STAGE" "$@"
done

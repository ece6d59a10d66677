#!/usr/bin/env bash
# The first run: tokenize the bundled corpus into the run's data directory, train a tiny
# SpikingBrain hybrid on it (GLA, sliding window, 76B-style H/F layers with sink tokens and
# MoE; examples/configs/first_run.yaml) on the GPU if there is one, else on 2 CPU ranks
# (gloo, expert parallel 2); the run ends by drawing its curves (metrics.png). Extra arguments
# go to the training command, e.g. --set train.train_iters=100.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=examples/configs/first_run.yaml
RUN_DIR=${RUN_DIR:-runs/first_run}   # tests point it elsewhere
DATA=$RUN_DIR/data/sample_corpus
if [[ ! -f $DATA.idx ]]; then
  python3 -m sbtrain.cli preprocess --input examples/data/sample_corpus.jsonl \
    --output-prefix "$DATA" --tokenizer examples/data/tokenizer.json
fi
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  LAUNCH=(--nproc_per_node=1 -m sbtrain.train "$CONFIG")
else
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  LAUNCH=(--nproc_per_node=2 -m sbtrain.train "$CONFIG" --set parallel.ep=2)
fi
# a fresh run each time (a run refuses to start at step 0 over an existing metrics.jsonl, and
# would resume from an existing checkpoint)
rm -rf "$RUN_DIR/metrics.jsonl" "$RUN_DIR/checkpoints"
torchrun --standalone "${LAUNCH[@]}" --set "train.run_dir=$RUN_DIR" --set "data.paths=[$DATA]" \
  --set "checkpoint.save_dir=$RUN_DIR/checkpoints" "$@"
echo "run directory $RUN_DIR: metrics.png (loss curves), metrics.jsonl (every step)," \
  "profile.json (throughput), resolved_config.yaml, checkpoints/; tokenized corpus $DATA.{bin,idx}"
# a quick look at what the model learned: greedy continuation of a prompt from the checkpoint
python3 -m sbtrain.cli generate --checkpoint "$RUN_DIR/checkpoints" --config "$CONFIG" \
  --set "data.paths=[$DATA]" --prompt "Simple risotto: you will need" --max-new-tokens 24

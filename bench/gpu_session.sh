#!/usr/bin/env bash
# The step-level benchmarks of the speed and MoE issues as named sets, one device call each:
# every command runs under its own time limit, a failure does not stop the next, and every
# command's log and results land in $OUT/<set>/ (runs/gpu_session/<set>/ without OUT).
#   bash bench/gpu_session.sh speed    # 7B width 8 layers 8K global batch 8: hybrid + softmax, peers
#   bash bench/gpu_session.sh moe      # 76B slice on one GPU: default and SB_PLATFORM=maca, profile
#   bash bench/gpu_session.sh profile  # torch.profiler of the 7B-width step after the speed work
#   bash bench/gpu_session.sh x2_tests # 2 GPUs: the multigpu test matrix, DP2xEP2 scaling (issue 18)
#   bash bench/gpu_session.sh x2_runs  # 2 GPUs: full-width 76B slice DP2xEP2, full 7B PP2 8K, SP2 128K
#   bash bench/gpu_session.sh x4       # 4 GPUs: 76B slice PP2xDP2xEP2, SP2xDP2, DP4xEP2 vs one GPU (issue 22)
#   bash bench/gpu_session.sh x8       # 8 GPUs: 76B slice DP4xPP2xEP2, full 7B SP4 256K and SP8 512K
# Each set fits one 600 s device call (the limits below add up to less).
# Wheels: scripts/fetch_gpu_wheels.sh before, carried as .whl/ (scripts/gpu_env.sh installs them).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 1
set_name="${1:?usage: gpu_session.sh speed|moe|profile|x2_tests|x2_runs|x4|x8}"
out="${OUT:-runs/gpu_session}/$set_name"
mkdir -p "$out"
# shellcheck source=scripts/gpu_env.sh
source scripts/gpu_env.sh || { echo "gpu_session: installing the carried wheels failed" >&2; exit 1; }
python3 -c "from ops.gla.tuning import seed_autotune_cache; seed_autotune_cache()"

status=0
step() {  # step NAME SECONDS CMD...: one command, its own limit and log
  local name="$1" limit="$2"; shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$out/session.log"
  local start=$SECONDS
  timeout --signal=TERM --kill-after=20 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc after $((SECONDS - start)) s" | tee -a "$out/session.log"
  tail -n 25 "$out/$name.log"
  flatten "$out/$name"
  [ "$rc" -ne 0 ] && status=1
}

flatten() {  # the device tool fetches only shallow files: copy each run's logs/json up to $out
  local dir="$1" file flat
  [ -d "$dir" ] || return 0
  find "$dir" -mindepth 2 -type f \( -name "*.log" -o -name "*.json" -o -name "*.txt" \) -size -2M |
    while read -r file; do
      flat="${file#"$out"/}"
      cp "$file" "$out/${flat//\//__}"
    done
}

# the 7B-width step at 8 layers, 8K, global batch 8 (issue 14 item 7 targets >= 45% MFU)
SEVEN_B_WIDTH=(--set model.hidden_size=3584 --set model.num_attention_heads=28 --set model.num_query_groups=4
  --set model.ffn_hidden_size=18944 --set model.vocab_size=152064 --set model.sliding_window=4096
  --set model.max_position_embeddings=131072 --set model.pattern=L-W-L-W-L-W-L-W-
  --set train.seq_length=8192 --set train.global_batch_size=1 --set train.micro_batch_size=1
  --set train.precision=bf16 --set data.kind=synthetic)

case "$set_name" in
  speed)
    step model_gbs8 330 python3 bench/bench_model.py --layers 8 --seqs 8192 --global-batch 8 --steps 4 \
      --recompute auto --out "$out/model_gbs8"
    step peers 200 python3 bench/bench_peers.py --layers 8 --seq 8192 --global-batch 8 --steps 3 \
      --recompute none --out "$out/peers"
    ;;
  moe)
    step moe_1gpu 330 python3 bench/bench_model.py --config examples/configs/spikingbrain_76b_1gpu.yaml \
      --steps 5 --global-batch 4 --recompute auto --platforms default maca --out "$out/moe_1gpu"
    step moe_profile 200 torchrun --standalone --nproc_per_node=1 bench/profile_step.py \
      examples/configs/spikingbrain_76b_1gpu.yaml --set train.recompute=auto --out "$out/moe_profile"
    ;;
  profile)
    step profile_7b 240 torchrun --standalone --nproc_per_node=1 bench/profile_step.py examples/configs/tiny.yaml \
      "${SEVEN_B_WIDTH[@]}" --set train.recompute=none --out "$out/profile_7b"
    ;;
  x2_tests)
    step multigpu_tests 330 python3 -m pytest -m multigpu tests/gpu/test_multigpu_layouts.py -q -x
    step layouts_76b_1gpu 240 python3 bench/bench_layouts.py examples/configs/spikingbrain_76b_1gpu.yaml \
      --layouts dp2_ep2 sp2 --overlap both --sp-blocking-too --steps 20 --out "$out/layouts_76b_1gpu"
    ;;
  x2_runs)
    step moe_2gpu 240 python3 bench/bench_model.py --config examples/configs/spikingbrain_76b_2gpu.yaml \
      --nproc 2 --steps 6 --recompute auto --platforms default maca --out "$out/moe_2gpu"
    step seven_b_pp2_8k 170 python3 bench/bench_model.py --config examples/configs/spikingbrain_7b.yaml \
      --nproc 2 --steps 5 --recompute auto --global-batch 4 --set parallel.pp=2 \
      --set train.seq_length=8192 --out "$out/seven_b_pp2_8k"
    step seven_b_sp2_128k 170 python3 bench/bench_model.py --config examples/configs/spikingbrain_7b.yaml \
      --nproc 2 --steps 4 --recompute auto --set parallel.pp=1 --set parallel.sp=2 \
      --set train.seq_length=131072 --set model.max_position_embeddings=131072 --set parallel.sp_softmax_exchange=auto --out "$out/seven_b_sp2_128k"
    ;;
  x4)
    step layouts_76b_x4 560 python3 bench/bench_layouts.py examples/configs/spikingbrain_76b_1gpu.yaml \
      --layouts pp2_dp2_ep2 sp2_dp2 dp4_ep2 --steps 20 --out "$out/layouts_76b_x4"
    ;;
  x8)
    step layouts_76b_x8 250 python3 bench/bench_layouts.py examples/configs/spikingbrain_76b_1gpu.yaml \
      --layouts dp4_pp2_ep2 --steps 20 --out "$out/layouts_76b_x8"
    step seven_b_sp4_256k 150 python3 bench/bench_model.py --config examples/configs/spikingbrain_7b.yaml \
      --nproc 4 --steps 3 --recompute auto --set parallel.pp=1 --set parallel.sp=4 \
      --set train.seq_length=262144 --set model.max_position_embeddings=262144 --set parallel.sp_softmax_exchange=auto --out "$out/seven_b_sp4_256k"
    step seven_b_sp8_512k 170 python3 bench/bench_model.py --config examples/configs/spikingbrain_7b.yaml \
      --nproc 8 --steps 3 --recompute auto --set parallel.pp=1 --set parallel.sp=8 \
      --set train.seq_length=524288 --set model.max_position_embeddings=524288 --set parallel.sp_softmax_exchange=auto --out "$out/seven_b_sp8_512k"
    ;;
  *) echo "gpu_session: unknown set '$set_name' (speed|moe|profile|x2_tests|x2_runs|x4|x8)" >&2; exit 2 ;;
esac
exit $status

"""Peer baseline: the same all-softmax model trained in plain Hugging Face transformers vs sbtrain.

    python3 bench/bench_peers.py [--layers 8] [--seq 8192] [--global-batch 8] [--steps 6]
                                 [--recompute full|none] [--precision autocast|bf16]
                                 [--skip-sbtrain] [--out DIR]
    python3 bench/bench_peers.py --tiny          # CPU smoke run of the transformers half

transformers: ``Qwen2ForCausalLM`` at SpikingBrain-7B width (hidden 3584, 28/4 heads, FFN 18944,
vocab 152064, ``--layers`` layers, untied embeddings, q/k/v bias), ``attn_implementation="sdpa"``
(the flash kernel at micro-batch 1), micro-batch 1 with ``--global-batch`` micro-batches
accumulated per step, gradient clipping at 1.0 and ``torch.optim.AdamW(fused=True)`` (the
Trainer's default ``adamw_torch_fused``). ``--precision autocast`` (default) is what the
Trainer's ``bf16=True`` does: fp32 weights, gradients and Adam states, bf16 autocast; it matches
sbtrain's mixed precision (bf16 compute, fp32 master weights and gradients). ``bf16`` keeps
the weights, gradients and Adam states in bf16 (no fp32 master; faster, not equivalent).
``--recompute full`` turns on HF gradient checkpointing (one whole layer per checkpoint, as
sbtrain's ``full``); ``none`` turns it off; HF has no selective mode.

sbtrain: the same shape as ``bench/bench_model.py --only softmax`` (``"*-" * layers``, same
seq, global batch, recompute policy, steps) in a child launch after the HF run has freed the GPU.

Both MFUs use sbtrain's FLOP count (``sbtrain.profiler.flops.flops_per_token`` of that model
config) and the same device peak (``maca_compat.platform``); both leave out the first step.
Prints a table with sbtrain/transformers tokens/s (issue 14 targets >= 1.3x) and writes
``peers.json`` to ``--out``. torchtitan is not compared: its wheel is pure Python but needs
datasets, torchdata, tyro, tensorboard, wandb and a matching torch, which the offline GPU
machine lacks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_model import WIDTH_7B  # noqa: E402
from maca_compat.platform import get_platform  # noqa: E402
from sbtrain.config.load import load_config  # noqa: E402
from sbtrain.profiler.flops import flops_per_token  # noqa: E402

TINY_WIDTH = {"model.hidden_size": 64, "model.num_attention_heads": 4, "model.num_query_groups": 2,
              "model.ffn_hidden_size": 128, "model.vocab_size": 512, "model.max_position_embeddings": 256}


def model_config(layers: int, tiny: bool):
    """sbtrain's ModelConfig of the all-softmax baseline (bench_model's softmax layout)."""
    width = TINY_WIDTH if tiny else WIDTH_7B
    overrides = [f"{k}={v}" for k, v in {**width, "model.pattern": "*-" * layers}.items()]
    return load_config(REPO / "examples/configs/tiny.yaml", overrides).model


def hf_model(model, precision: str, recompute: str, device: torch.device):
    """Qwen2ForCausalLM with ``model``'s shape (transformers is imported here: only this half needs it)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=model.vocab_size, hidden_size=model.hidden_size, intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=len(model.pattern) // 2, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups, max_position_embeddings=model.max_position_embeddings,
        rope_theta=model.rope_theta, rms_norm_eps=model.norm_eps, tie_word_embeddings=not model.untie_embeddings,
        use_cache=False, attn_implementation="sdpa")
    with torch.device(device):
        hf = Qwen2ForCausalLM(config)
    if precision == "bf16":
        hf = hf.to(torch.bfloat16)
    if recompute == "full":
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.train()
    return hf


def train_hf(args: argparse.Namespace, model, device: torch.device) -> dict:
    """Time ``args.steps`` optimizer steps of HF training; the first is warm-up."""
    hf = hf_model(model, args.precision, args.recompute, device)
    attn = getattr(hf.config, "_attn_implementation", "?")
    optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-5, weight_decay=0.1, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "autocast")
    gen = torch.Generator(device=device).manual_seed(0)
    times = []
    for _ in range(args.steps):
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.global_batch):
            tokens = torch.randint(0, model.vocab_size, (1, args.seq), device=device, generator=gen)
            with autocast:
                loss = hf(input_ids=tokens, labels=tokens).loss / args.global_batch
            loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del hf, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return _result("transformers", times, args, model, {"attn_implementation": attn, "peak_gib": peak,
                                                         "precision": args.precision})


def train_sbtrain(args: argparse.Namespace, model) -> dict:
    """bench_model's softmax case at the same shape, in a child launch."""
    out = Path(args.out) / "sbtrain"
    cmd = [sys.executable, str(REPO / "bench/bench_model.py"), "--only", "softmax", "--layers", str(args.layers),
           "--seqs", str(args.seq), "--steps", str(args.steps), "--global-batch", str(args.global_batch),
           "--recompute", args.recompute, "--out", str(out)]
    print("== sbtrain:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=False)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else []
    if not results or "error" in results[0]:
        return {"name": "sbtrain", "error": results[0]["error"] if results else "no results"}
    r = results[0]
    return {"name": "sbtrain", "tokens_per_s": r["tokens_per_s"], "step_s": r["step_s"], "mfu": r["mfu"],
            "peak_gib": r["peak_gib"], "precision": "bf16 params, fp32 main grads and master (Megatron)"}


def _result(name: str, times: list[float], args: argparse.Namespace, model, extra: dict) -> dict:
    measured = times[1:] if len(times) > 1 else times
    step_s = statistics.median(measured)
    tokens_per_s = args.global_batch * args.seq / step_s
    fpt = flops_per_token(model, args.seq)["total"]
    peak = get_platform().peak_bf16_flops
    return {"name": name, "tokens_per_s": tokens_per_s, "step_s": step_s, "first_step_s": times[0],
            "mfu": fpt * tokens_per_s / peak if peak else None, "flops_per_token": fpt, "peak_flops": peak,
            **extra}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def table(results: list[dict]) -> str:
    lines = ["| framework | tokens/s | step s | MFU | peak GiB | precision | vs transformers |", "|---|---|---|---|---|---|---|"]
    base = next((r for r in results if r["name"] == "transformers" and "error" not in r), None)
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['error']} | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "n/a"
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        lines.append(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {mfu} | {peak} | "
                     f"{r['precision']} | {ratio} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--global-batch", type=int, default=8, help="micro-batches of 1 accumulated per step")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps; the first is warm-up")
    p.add_argument("--recompute", choices=["full", "none"], default="full")
    p.add_argument("--precision", choices=["autocast", "bf16"], default="autocast")
    p.add_argument("--skip-sbtrain", action="store_true", help="only the transformers run")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny width, seq 64, no sbtrain launch")
    p.add_argument("--out", default="runs/bench_peers")
    args = p.parse_args(argv)
    if args.tiny:
        args.seq, args.global_batch, args.steps, args.skip_sbtrain = min(args.seq, 64), min(args.global_batch, 2), \
            min(args.steps, 2), True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = get_platform().device(0)
    if device.type != "cuda" and not args.tiny:
        print("bench_peers needs a CUDA/MACA GPU (or --tiny for a CPU smoke run)", file=sys.stderr)
        return 2
    model = model_config(args.layers, args.tiny)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(f"== transformers: {args.layers} layers, seq {args.seq}, global batch {args.global_batch}, "
          f"recompute {args.recompute}, precision {args.precision}", flush=True)
    results = [train_hf(args, model, device)]
    print(f"   {results[0]}", flush=True)
    if not args.skip_sbtrain:
        results.append(train_sbtrain(args, model))
    (Path(args.out) / "peers.json").write_text(json.dumps(results, indent=2))
    print(f"\n{get_platform().device_name} | {args.layers} softmax layers at "
          f"{'tiny' if args.tiny else '7B'} width | seq {args.seq} | global batch {args.global_batch} | "
          f"recompute {args.recompute}\n")
    print(table(results))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

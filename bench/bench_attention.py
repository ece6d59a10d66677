"""Causal softmax attention fwd+bwd on one GPU: SDPA flash (full causal) vs flex (window / full causal).

Usage:
    python3 bench/bench_attention.py [--lengths 4096 16384 65536] [--tokens 65536] [--heads 28]
        [--kv-heads 4] [--dim 128] [--window 4096] [--dtype bf16] [--warmup 3] [--iters 10] [--sinks 128]

``--sinks S`` adds sink-token attention (``ops.attention.attention(..., sinks=S)``, SpikingBrain-76B) with S sinks:
the ``flex`` backend with the window and full causal, and the ``lse_merge`` backend with the
window. Only the regular output is back-propagated (the kernels still compute the sink rows).

Each length T runs batch = tokens // T sequences, so every row of the table moves the same
number of tokens. Times are CUDA-event means over ``--iters`` fwd+bwd steps after
``--warmup`` steps (the first flex step compiles); peak memory is the allocator's peak
during the timed steps minus what was allocated before them (inputs, do and grads). Prints a
markdown table and one JSON line. The comparable figures measured on one H100 outside this repository (anchor runs):
(SDPA flash 0.22 / 0.77 / 3.03 µs per token, flex window
4096 0.30 / 0.58 / 0.65 µs per token at 4K / 16K / 64K).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ops.attention.flex import flex_attention_backend  # noqa: E402
from ops.attention.lse_merge import lse_merge_attention  # noqa: E402
from ops.attention.sdpa import sdpa_attention  # noqa: E402



def flex_softmax_attention(q, k, v, window=None):
    return flex_attention_backend(q, k, v, window=window)


def sdpa_causal_attention(q, k, v, window=None):
    return sdpa_attention(q, k, v, window=window)


def with_sinks(backend):
    """(q, k, v, q_sink, k_sink, v_sink, window) -> (out, out_sink) through ``backend`` with [sinks; tokens]."""

    def call(q, k, v, q_sink, k_sink, v_sink, window=None):
        S = q_sink.shape[2]
        out = backend(*(torch.cat([s, t], dim=2) for s, t in zip((q_sink, k_sink, v_sink), (q, k, v))),
                      window=window, sinks=S)
        return out[:, :, S:], out[:, :, :S]

    return call


flex_sink_attention = with_sinks(flex_attention_backend)
lse_merge_sink_attention = with_sinks(lse_merge_attention)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--tokens", type=int, default=65536, help="tokens per call (batch = tokens // T)")
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--sinks", type=int, default=0, help="also time sink attention with this many sinks (0: off)")
    return p.parse_args(argv)


def cases(window: int) -> dict[str, tuple[Callable[..., torch.Tensor], int | None]]:
    """name -> (implementation, window) of the three measured configurations."""
    return {
        "sdpa_causal": (sdpa_causal_attention, None),
        f"flex_window{window}": (flex_softmax_attention, window),
        "flex_causal": (flex_softmax_attention, None),
    }


def sink_cases(window: int) -> dict[str, tuple[Callable[..., tuple[torch.Tensor, torch.Tensor]], int | None]]:
    """name -> (sink-attention implementation, window), measured when --sinks > 0."""
    return {
        f"sink_flex_window{window}": (flex_sink_attention, window),
        "sink_flex_causal": (flex_sink_attention, None),
        f"sink_lse_merge_window{window}": (lse_merge_sink_attention, window),
    }


def measure(fn: Callable[..., torch.Tensor], window: int | None, q, k, v, do, warmup: int, iters: int) -> dict:
    """Mean fwd+bwd milliseconds and peak extra memory of ``fn`` on these inputs."""

    def step() -> None:
        q.grad = k.grad = v.grad = None
        fn(q, k, v, window).backward(do)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return {"ms": start.elapsed_time(end) / iters, "peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}


def run_length(args: argparse.Namespace, T: int) -> dict:
    """All cases at sequence length T, plus the flex-vs-SDPA output check for full causal."""
    B = max(1, args.tokens // T)
    dtype = DTYPES[args.dtype]
    g = torch.Generator(device="cuda").manual_seed(T)

    def rand(heads: int) -> torch.Tensor:
        x = torch.randn(B, heads, T, args.dim, device="cuda", dtype=dtype, generator=g)
        return x.requires_grad_()

    q, k, v = rand(args.heads), rand(args.kv_heads), rand(args.kv_heads)
    do = torch.randn_like(q)
    row = {"T": T, "batch": B, "tokens": B * T}
    for name, (fn, window) in cases(args.window).items():
        r = measure(fn, window, q, k, v, do, args.warmup, args.iters)
        row[name] = {"us_per_token": r["ms"] * 1e3 / (B * T), "ms": r["ms"], "peak_gib": r["peak_gib"]}
    if args.sinks > 0:
        S = args.sinks
        # one learned set of sinks for the whole batch, as in the model (grads reduce over the batch)
        sinks = [torch.randn(1, h, S, args.dim, device="cuda", dtype=dtype, generator=g).requires_grad_()
                 .expand(B, h, S, args.dim) for h in (args.heads, args.kv_heads, args.kv_heads)]
        for name, (sink_fn, window) in sink_cases(args.window).items():
            fn = lambda q, k, v, w, sink_fn=sink_fn: sink_fn(q, k, v, *sinks, w)[0]  # noqa: E731
            r = measure(fn, window, q, k, v, do, args.warmup, args.iters)
            row[name] = {"us_per_token": r["ms"] * 1e3 / (B * T), "ms": r["ms"], "peak_gib": r["peak_gib"]}
    with torch.no_grad():
        a, b = flex_softmax_attention(q, k, v).float(), sdpa_causal_attention(q, k, v).float()
        row["flex_vs_sdpa_rel_rms"] = ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()
    return row


def markdown(rows: list[dict], names: list[str]) -> str:
    head = "| T | batch | " + " | ".join(f"{n} µs/tok (peak GiB)" for n in names) + " | flex vs SDPA rel. RMS |"
    lines = [head, "|" + "---|" * (len(names) + 3)]
    for r in rows:
        cells = " | ".join(f"{r[n]['us_per_token']:.3f} ({r[n]['peak_gib']:.2f})" for n in names)
        lines.append(f"| {r['T']} | {r['batch']} | {cells} | {r['flex_vs_sdpa_rel_rms']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: no CUDA GPU here; this benchmark times CUDA kernels (SDPA flash, "
              "compiled flex_attention) and has nothing to measure on CPU.", file=sys.stderr)
        return 1
    import torch._dynamo as dynamo

    if dynamo.config.disable:
        print("bench_attention: torch.compile is disabled (TORCH_COMPILE_DISABLE=1); flex would run "
              "unfused. Unset it.", file=sys.stderr)
        return 1
    rows = [run_length(args, T) for T in args.lengths]
    names = list(cases(args.window)) + (list(sink_cases(args.window)) if args.sinks > 0 else [])
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, "
          f"{args.heads} q-heads / {args.kv_heads} kv-heads, d={args.dim}, {args.tokens} tokens per call, "
          f"fwd+bwd, mean of {args.iters} after {args.warmup} warm-up")
    print(markdown(rows, names))
    print(json.dumps({"bench": "attention", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      **{k: v for k, v in vars(args).items() if k != "lengths"}, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

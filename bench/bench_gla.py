"""Benchmark the ``gla`` op (GQA inputs) against fla's ``chunk_gla`` called directly.

For each sequence length T (batch = tokens // T) it times forward + backward of
  (a) ``ops.gla.gla`` on GQA inputs (k, v, g with ``--kv-heads`` heads), as dispatched: the
      ``gqa_chunk`` backend for grouped inputs on a GPU (k, v, g never expanded),
  (e) the ``fla_chunk`` backend on the same inputs (it expands k, v, g to every query head and
      sums their gradients back: the path before ``gqa_chunk``), and
  (b) ``fla.ops.gla.chunk_gla`` on inputs already expanded to ``--heads`` heads (expansion untimed),
and prints µs per token, the ratios (a)/(b) and (e)/(b) and peak memory as a markdown table plus
one JSON line. ``--check`` first compares the outputs and gradients of (a) and (b) once.

    python3 bench/bench_gla.py [--lengths 4096 16384 65536] [--tokens 65536] [--heads 28]
                               [--kv-heads 4] [--dim 128] [--dtype bf16] [--check]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

# run from a checkout without installing sbtrain: `python3 bench/bench_gla.py` puts bench/ first
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops.gla import gla  # noqa: E402
from ops.gla.fla_backend import gla_fla_chunk  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# SpikingBrain's gate: logsigmoid(x) / 16, i.e. slow decays and long memory
GATE_LOGIT_NORMALIZER = 16.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--tokens", type=int, default=65536, help="tokens per step; batch = tokens // T")
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=128, help="head dim K = V")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations (include Triton autotuning)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations; the median is reported")
    p.add_argument("--check", action="store_true", help="compare (a) and (b) once before timing")
    return p.parse_args(argv)


def make_inputs(B: int, T: int, H: int, Hkv: int, D: int, dtype: torch.dtype, device: str = "cuda"
                ) -> dict[str, Tensor]:
    """GQA inputs (leaves that need grad) and the upstream gradient of the output."""
    dev = torch.device(device)

    def leaf(heads: int) -> Tensor:
        return torch.randn(B, T, heads, D, device=dev, dtype=dtype).requires_grad_()

    g = (F.logsigmoid(torch.randn(B, T, Hkv, D, device=dev)) / GATE_LOGIT_NORMALIZER).to(dtype)
    return {"q": leaf(H), "k": leaf(Hkv), "v": leaf(Hkv), "g": g.requires_grad_(),
            "do": torch.randn(B, T, H, D, device=dev, dtype=dtype)}


def expanded(inputs: dict[str, Tensor], group: int) -> dict[str, Tensor]:
    """The same inputs with k, v, g repeated to every query head, as fresh leaves."""
    out = dict(inputs)
    for name in ("k", "v", "g"):
        out[name] = inputs[name].detach().repeat_interleave(group, dim=2).requires_grad_()
    return out


def step_fn(fn: Callable, x: dict[str, Tensor]) -> Callable[[], tuple[Tensor, ...]]:
    """One forward + backward of ``fn``; returns (o, dq, dk, dv, dg)."""
    leaves = [x["q"], x["k"], x["v"], x["g"]]

    def step() -> tuple[Tensor, ...]:
        o, _ = fn(*leaves)
        return (o, *torch.autograd.grad(o, leaves, x["do"]))

    return step


def time_step(step: Callable[[], object], warmup: int, iters: int) -> tuple[float, float]:
    """Median milliseconds per step (CUDA events) and peak allocated GiB during the timed steps."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def rel_rms(got: Tensor, ref: Tensor) -> float:
    got, ref = got.double(), ref.double()
    return ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def check(ours: Callable, theirs: Callable, Hkv: int, tol: float = 1e-2) -> bool:
    """Compare outputs and gradients of (a) and (b); fla's k/v/g grads are summed per kv group."""
    a, b = ours(), theirs()
    ok = True
    for name, x, y in zip(("o", "dq", "dk", "dv", "dg"), a, b):
        if x.shape != y.shape:
            B, T, H, D = y.shape
            y = y.float().view(B, T, Hkv, H // Hkv, D).sum(dim=3)
        err = rel_rms(x, y)
        ok &= err <= tol
        print(f"check {name}: relative RMS {err:.2e} ({'ok' if err <= tol else f'> {tol:.0e}'})")
    return ok


def bench_length(args: argparse.Namespace, T: int, compare: bool) -> dict:
    """Time (a) and (b) at length T (after comparing them if ``compare``)."""
    # fla probes the devices when imported, so only once a GPU is known to be there
    from fla.ops.gla import chunk_gla

    dtype, group = DTYPES[args.dtype], args.heads // args.kv_heads
    B = max(1, args.tokens // T)
    x = make_inputs(B, T, args.heads, args.kv_heads, args.dim, dtype)
    backend = gla.registry.select(x["q"], x["k"], x["v"], x["g"]).name
    ours, theirs = step_fn(gla, x), step_fn(chunk_gla, expanded(x, group))
    expanding = step_fn(gla_fla_chunk, x)
    checked = check(ours, theirs, args.kv_heads) if compare else None
    ms_a, mem_a = time_step(ours, args.warmup, args.iters)
    ms_e, mem_e = time_step(expanding, args.warmup, args.iters)
    ms_b, mem_b = time_step(theirs, args.warmup, args.iters)
    tokens = B * T
    return {"T": T, "batch": B, "backend": backend, "us_per_token_gla": 1e3 * ms_a / tokens,
            "us_per_token_fla_expand": 1e3 * ms_e / tokens, "us_per_token_fla": 1e3 * ms_b / tokens,
            "ratio": ms_a / ms_b, "ratio_fla_expand": ms_e / ms_b,
            "peak_gib_gla": mem_a, "peak_gib_fla_expand": mem_e, "peak_gib_fla": mem_b, "check_ok": checked}


def print_table(rows: list[dict]) -> None:
    print("| T | batch | (a) gla backend | (a) µs/token | (e) fla_chunk µs/token | (b) fla pre-expanded µs/token "
          "| (a)/(b) | (e)/(b) | peak GiB (a) / (e) / (b) |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['T']} | {r['batch']} | {r['backend']} | {r['us_per_token_gla']:.4f} | "
              f"{r['us_per_token_fla_expand']:.4f} | {r['us_per_token_fla']:.4f} | {r['ratio']:.3f} | "
              f"{r['ratio_fla_expand']:.3f} | {r['peak_gib_gla']:.2f} / {r['peak_gib_fla_expand']:.2f} / "
              f"{r['peak_gib_fla']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gla: needs a CUDA/MACA GPU (torch.cuda.is_available() is False); "
              "the fla kernels it times do not run on the CPU.", file=sys.stderr)
        return 1
    if args.heads % args.kv_heads:
        print(f"bench_gla: --heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}", file=sys.stderr)
        return 2
    rows = []
    for i, T in enumerate(args.lengths):
        # one comparison is enough: later lengths run the same kernels
        rows.append(bench_length(args, T, compare=args.check and i == 0))
        torch.cuda.empty_cache()
    print_table(rows)
    meta = {"bench": "gla", "device": torch.cuda.get_device_name(), "dtype": args.dtype, "heads": args.heads,
            "kv_heads": args.kv_heads, "dim": args.dim, "tokens": args.tokens, "iters": args.iters}
    print(json.dumps({**meta, "results": rows}))
    if rows and rows[0]["check_ok"] is False:
        print("bench_gla: --check found (a) and (b) differ", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Elementwise fusions vs their torch references, forward + backward, at 7B shapes.

    python3 bench/bench_fusions.py [--tokens 8192] [--hidden 3584] [--ffn 18944] [--heads 28]
                                   [--kv-heads 4] [--head-dim 128] [--dtype bf16]

Ops (each: the registry's torch reference, then the Triton backend, same inputs):
    swiglu          fc1 output [tokens, 2 * ffn] -> [tokens, ffn]   (every MLP / expert)
    head_rms_norm   [tokens, heads, head_dim], fp32 math, one shared weight (GLA / hybrid outputs)
    gate_log_decay  GLA gate [tokens, kv_heads * head_dim] / 16; hybrid key gate
                    [tokens, kv_heads, head_dim], negated, on a strided view of the fused qkv
Context rows (not ours): Megatron's torch.compile'd SwiGLU (``bias_activation_fusion=True``)
and torch.nn.RMSNorm (the layer norms; fused ATen kernel on CUDA) vs its composite formula.

Each row times ``y = f(x); autograd.grad(y, inputs, dy)`` (CUDA events, bench/timing.py) and
reports the largest difference of the fast path from the reference over the output and every
gradient, relative to that tensor's largest value (the numeric change the fusion brings).
Prints a markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--ffn", type=int, default=18944)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    return p.parse_args(argv)


def fwd_bwd(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], dy: torch.Tensor):
    """A closure running ``fn`` forward and backward; and its output and gradients once."""
    leaves = [t.detach().requires_grad_() for t in inputs]

    def step():
        y = fn(*leaves)
        return [y, *torch.autograd.grad(y, leaves, dy)]

    return step, [t.detach() for t in step()]


def relative_change(fast: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
               for a, b in zip(fast, ref))


def cases(args: argparse.Namespace, dtype: torch.dtype, dev: str = "cuda"):
    """(name, shape text, reference fn, fast fn, inputs, dy) per row of the table."""
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    from ops.gla_gate import gate_log_decay
    from ops.gla_gate.triton_kernels import gate_log_decay_triton
    from ops.rmsnorm import head_rms_norm
    from ops.rmsnorm.triton_kernels import head_rms_norm_triton
    from ops.swiglu import swiglu
    from ops.swiglu.triton_kernels import swiglu_triton

    reference = {op.registry.op_name: op.registry.reference.fn for op in (swiglu, head_rms_norm, gate_log_decay)}
    t = args.tokens
    randn = lambda *s, dt=dtype: torch.randn(s, device=dev).to(dt)  # noqa: E731
    x = randn(t, 2 * args.ffn)
    dy = randn(t, args.ffn)
    yield ("swiglu", f"[{t}, 2x{args.ffn}]", reference["swiglu"], swiglu_triton, [x], dy)
    yield ("swiglu (megatron compiled)", f"[{t}, 2x{args.ffn}]", reference["swiglu"],
           lambda a: bias_swiglu_impl(a, None, False, False), [x], dy)
    o, w, eps = randn(t, args.heads, args.head_dim), 1 + 0.1 * randn(args.head_dim), 1e-6
    yield ("head_rms_norm", f"[{t}, {args.heads}, {args.head_dim}]",
           lambda a, b: reference["head_rms_norm"](a, b, eps), lambda a, b: head_rms_norm_triton(a, b, eps),
           [o, w], randn(t, args.heads, args.head_dim))
    g = randn(t, args.kv_heads * args.head_dim)
    yield ("gate_log_decay GLA /16", f"[{t}, {args.kv_heads * args.head_dim}]",
           lambda a: reference["gate_log_decay"](a, 16.0), lambda a: gate_log_decay_triton(a, 16.0),
           [g], randn(*g.shape, dt=torch.float32))
    qkv = randn(t, args.kv_heads, (args.heads // args.kv_heads + 2) * args.head_dim)
    k = qkv[..., -2 * args.head_dim:-args.head_dim]  # a strided view, as split_qkv gives it
    yield ("gate_log_decay key gate", f"[{t}, {args.kv_heads}, {args.head_dim}] view",
           lambda a: reference["gate_log_decay"](a, negate=True), lambda a: gate_log_decay_triton(a, 1.0, True),
           [k], randn(*k.shape, dt=torch.float32))
    h, wn = randn(t, args.hidden), 1 + 0.1 * randn(args.hidden)
    composite = lambda a, b: a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + eps) * b  # noqa: E731
    yield ("layer RMSNorm: torch fused vs composite", f"[{t}, {args.hidden}]", composite,
           lambda a, b: torch.nn.functional.rms_norm(a, (args.hidden,), b, eps), [h, wn], randn(t, args.hidden))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fusions: needs a CUDA/MACA GPU (torch.cuda.is_available() is False); nothing measured.",
              file=sys.stderr)
        return 1
    # run from a checkout without installing sbtrain
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.timing import time_ms

    dtype = DTYPES[args.dtype]
    rows = []
    for name, shape, ref_fn, fast_fn, inputs, dy in cases(args, dtype):
        ref_step, ref_out = fwd_bwd(ref_fn, inputs, dy)
        fast_step, fast_out = fwd_bwd(fast_fn, inputs, dy)
        ref_ms = time_ms(ref_step, args.warmup, args.iters)
        fast_ms = time_ms(fast_step, args.warmup, args.iters)
        rows.append(dict(op=name, shape=shape, reference_ms=round(ref_ms, 3), fast_ms=round(fast_ms, 3),
                         speedup=round(ref_ms / fast_ms, 2), max_rel_change=relative_change(fast_out, ref_out)))
        del ref_out, fast_out
        torch.cuda.empty_cache()

    device = torch.cuda.get_device_name()
    print(f"elementwise fusions, forward + backward, {args.dtype} on {device}\n")
    print("| op | shape | reference (ms) | fast (ms) | speedup | max change (rel. to max) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['op']} | {r['shape']} | {r['reference_ms']:.3f} | {r['fast_ms']:.3f} | "
              f"{r['speedup']:.2f}x | {r['max_rel_change']:.2e} |")
    print(json.dumps({"bench": "fusions", "device": device, "dtype": args.dtype, "tokens": args.tokens,
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

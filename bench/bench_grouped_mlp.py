"""Routed-expert FFN: grouped GEMM backends vs the per-expert loop, forward + backward.

    python3 bench/bench_grouped_mlp.py [--shapes 76b,reduced] [--experts 16] [--tokens 8192] [--main-grad]

Shapes: ``76b`` = hidden 3584, expert FFN 18944 (the full 76B widths); ``reduced`` = hidden
2048, FFN 4096 (spikingbrain_76b_1gpu.yaml). ``--experts`` is the number of experts on the
GPU (16 = EP1; the 2-GPU slice runs 8 per GPU). Tokens are routed top-1 with uneven counts
(a skewed multinomial, seed 0; the min/max count is printed).

Rows: ``torch`` = the per-expert loop (what Megatron's SequentialMLP does, host sync
included), ``grouped_mm`` = ``torch._grouped_mm`` (CUDA Hopper), ``triton`` = our Triton
grouped GEMM; each with weights pre-stacked ``[E, ...]`` and as per-expert lists (what
``GroupedExperts`` passes: the stack copy is inside the timing). Time is fwd + bwd of
``grouped_swiglu_mlp`` (both GEMMs, SwiGLU, probs scale; dX, dW1, dW2, dprobs); TFLOP/s counts
the six GEMMs, 18 * T * H * F. ``max|err|`` is against the loop in the same dtype, relative
to the loop output's max. Prints a markdown table, then one JSON line.

``--main-grad`` adds an A/B of the weight-gradient path under Megatron DDP per fast backend:
per-expert parameters whose fp32 ``main_grad`` lie in one buffer as DDP lays them out (reversed,
fc1/fc2 interleaved) with megatron-core's own DDP backward hook (``tests/ops/ddp_hooks.py``):
``unfused`` returns ``2E`` bf16 ``dW`` that the hook adds one kernel each, ``fused``
(``grad_accum_fusion=True``, what training does on CUDA) writes them into the main grads
(Triton: accumulating dW kernel; grouped_mm: one add over the region). Time per fwd+bwd and the
relative RMS difference of the main grads after one call each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

SHAPES = {"76b": (3584, 18944), "reduced": (2048, 4096)}
BACKENDS = ("torch", "grouped_mm", "triton")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="76b,reduced", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--main-grad", action="store_true",
                   help="also A/B the fused vs unfused weight-gradient path under DDP's main_grad")
    return p.parse_args(argv)


def uneven_counts(tokens: int, experts: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    skew = torch.rand(experts, generator=gen) ** 3 + 0.02
    owner = torch.multinomial(skew / skew.sum(), tokens, replacement=True, generator=gen)
    return torch.bincount(owner, minlength=experts)


def make_inputs(hidden: int, ffn: int, experts: int, counts: torch.Tensor):
    gen = torch.Generator(device="cuda").manual_seed(1)
    tokens = int(counts.sum())

    def rnd(*shape, scale):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).bfloat16()

    x = rnd(tokens, hidden, scale=1.0).requires_grad_()
    w1 = rnd(experts, 2 * ffn, hidden, scale=hidden ** -0.5).requires_grad_()
    w2 = rnd(experts, hidden, ffn, scale=ffn ** -0.5).requires_grad_()
    probs = torch.rand(tokens, device="cuda", generator=gen).requires_grad_()
    grad = rnd(tokens, hidden, scale=1.0)
    return x, w1, w2, probs, grad


def step_fn(mlp, x, counts, w1, w2, probs, grad):
    def step():
        x.grad = w1.grad = w2.grad = probs.grad = None
        out = mlp(x, counts, w1, w2, probs)
        out.backward(grad)
        return out
    return step


def bench_shape(name: str, args, results: dict) -> None:
    from bench.timing import time_ms
    from ops.grouped_mlp import grouped_swiglu_mlp

    hidden, ffn = SHAPES[name]
    counts_host = uneven_counts(args.tokens, args.experts)
    counts = counts_host.cuda()
    x, w1, w2, probs, grad = make_inputs(hidden, ffn, args.experts, counts_host)
    flops = 18 * args.tokens * hidden * ffn
    print(f"\n### {name}: hidden {hidden}, FFN {ffn}, {args.experts} experts, {args.tokens} tokens "
          f"(per expert min {int(counts_host.min())} max {int(counts_host.max())})\n")
    print("| backend | weights | fwd+bwd ms | TFLOP/s | max abs err / max |out| |")
    print("|---|---|---:|---:|---:|")
    reference = None
    for backend in BACKENDS:
        os.environ["SB_OP_BACKEND_GROUPED_LINEAR"] = backend
        for layout in ("stacked", "list"):
            if layout == "stacked":
                mlp = grouped_swiglu_mlp
            else:
                def mlp(x, c, w1, w2, p):   # per-expert views, stacked inside the op as in the module
                    return grouped_swiglu_mlp(x, c, list(w1.unbind(0)), list(w2.unbind(0)), p)
            step = step_fn(mlp, x, counts, w1, w2, probs, grad)
            try:
                out = step().detach().float()
                ms = time_ms(step, args.warmup, args.iters)
            except Exception as exc:   # report a backend that rejects these shapes, keep going
                print(f"| {backend} | {layout} | failed: {type(exc).__name__}: {exc} | | |")
                continue
            if reference is None:
                reference = out
            err = float((out - reference).abs().max() / reference.abs().max())
            tflops = flops / ms / 1e9
            print(f"| {backend} | {layout} | {ms:.2f} | {tflops:.0f} | {err:.2e} |")
            results[f"{name}/{backend}/{layout}"] = {"ms": ms, "tflops": tflops, "rel_err": err}
    os.environ.pop("SB_OP_BACKEND_GROUPED_LINEAR", None)


def bench_main_grad(name: str, args, results: dict) -> None:
    from bench.timing import time_ms
    from ops.grouped_mlp import grouped_swiglu_mlp
    from tests.ops.ddp_hooks import DDPGrads, interleaved_megatron_order  # megatron-core's DDP hook

    hidden, ffn = SHAPES[name]
    counts_host = uneven_counts(args.tokens, args.experts)
    counts = counts_host.cuda()
    x, w1, w2, probs, grad = make_inputs(hidden, ffn, args.experts, counts_host)
    w1s = [torch.nn.Parameter(w.detach().clone()) for w in w1.unbind(0)]
    w2s = [torch.nn.Parameter(w.detach().clone()) for w in w2.unbind(0)]
    del w1, w2
    params = [*w1s, *w2s]
    ddp = DDPGrads(params, interleaved_megatron_order(args.experts), overlap_grad_reduce=False)
    print(f"\n### {name}: weight gradients into DDP's fp32 main_grad, unfused (bf16 dW + DDP add "
          f"per expert) vs fused\n")
    print("| backend | mode | fwd+bwd ms | main_grad rel RMS fused vs unfused |")
    print("|---|---|---:|---:|")
    for backend in ("grouped_mm", "triton"):
        os.environ["SB_OP_BACKEND_GROUPED_LINEAR"] = backend
        main_grads = {}
        for mode, fusion in (("unfused", False), ("fused", True)):
            def step():
                x.grad = probs.grad = None
                for p in params:   # as DDP's zero_grad_buffer, every step
                    p.grad_added_to_main_grad = False
                grouped_swiglu_mlp(x, counts, w1s, w2s, probs, grad_accum_fusion=fusion).backward(grad)
            try:
                ddp.buffer.zero_()
                step()
                main_grads[mode] = ddp.buffer.clone()
                ms = time_ms(step, args.warmup, args.iters)
            except Exception as exc:   # report a backend that rejects these shapes, keep going
                print(f"| {backend} | {mode} | failed: {type(exc).__name__}: {exc} | |")
                continue
            err = None
            if mode == "fused" and "unfused" in main_grads:
                a, b = main_grads["fused"], main_grads["unfused"]
                err = float(((a - b).pow(2).mean() / b.pow(2).mean()).sqrt())
            print(f"| {backend} | {mode} | {ms:.2f} | {'' if err is None else f'{err:.2e}'} |")
            results[f"{name}/{backend}/main_grad_{mode}"] = {"ms": ms, "rel_rms": err}
        del main_grads
    os.environ.pop("SB_OP_BACKEND_GROUPED_LINEAR", None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_grouped_mlp: needs a CUDA/MACA GPU; nothing measured.", file=sys.stderr)
        return 1
    # run from a checkout without installing sbtrain
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    results: dict = {}
    for name in args.shapes.split(","):
        bench_shape(name, args, results)
        if args.main_grad:
            bench_main_grad(name, args, results)
    print(json.dumps({"bench": "grouped_mlp", "experts": args.experts, "tokens": args.tokens,
                      "device": torch.cuda.get_device_name(), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

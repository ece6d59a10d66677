"""The optimizer-step path without Apex/TE: stock megatron-core vs maca_compat.fused_optim.

    python3 bench/bench_optimizer.py [--params-m 400] [--tensors 300] [--tokens 8192]
                                     [--hidden 3584] [--ffn 18944]

Rows (CUDA events, bench/timing.py), on ``--tensors`` fp32 tensors holding ``--params-m``
million parameters in all (one rank's distributed-optimizer shard):
    adam            torch AdamW: foreach (what megatron builds without Apex/TE) vs fused
    grad_norm       megatron.core.utils.local_multi_tensor_l2_norm (a norm and a host sync
                    per tensor) vs fused_optim.foreach_l2_norm
    clip_scale      local_multi_tensor_scale (Python loop) vs foreach_scale, in place
    wgrad_<name>    a linear's weight gradient [tokens, in] x [tokens, out], bf16: bf16 GEMM +
                    add into fp32 main_grad (stock) vs fused_optim.wgrad_gemm_accum (fp32 out)
Prints a markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import time_ms  # noqa: E402
from maca_compat.fused_optim import (  # noqa: E402
    cuda_wgrad_route,
    foreach_l2_norm,
    foreach_scale,
    pinned_adam,
    wgrad_gemm_accum,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params-m", type=float, default=400.0)
    p.add_argument("--tensors", type=int, default=300)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--ffn", type=int, default=18944)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    return p.parse_args(argv)


def _tensors(args) -> list[torch.Tensor]:
    per = int(args.params_m * 1e6 / args.tensors)
    return [torch.randn(per, device="cuda") * 1e-3 for _ in range(args.tensors)]


def bench_adam(args) -> dict:
    times = {}
    for impl in ("foreach", "fused"):
        params = [torch.nn.Parameter(t) for t in _tensors(args)]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = pinned_adam(torch.optim.AdamW, impl)(params, lr=1e-4, weight_decay=0.1)
        times[impl] = time_ms(opt.step, args.warmup, args.iters)
    return {"op": "adam", "stock_ms": times["foreach"], "ours_ms": times["fused"]}


def bench_norm_and_scale(args) -> list[dict]:
    from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale

    grads = _tensors(args)
    flag = torch.zeros(1, dtype=torch.int, device="cuda")
    stock_norm = time_ms(lambda: local_multi_tensor_l2_norm(0, flag, [grads], False),
                         args.warmup, args.iters)
    ours_norm = time_ms(lambda: foreach_l2_norm(0, flag, [grads], False), args.warmup, args.iters)
    stock_scale = time_ms(lambda: local_multi_tensor_scale(0, flag, [grads, grads], 0.999),
                          args.warmup, args.iters)
    ours_scale = time_ms(lambda: foreach_scale(0, flag, [grads, grads], 0.999),
                         args.warmup, args.iters)
    return [{"op": "grad_norm", "stock_ms": stock_norm, "ours_ms": ours_norm},
            {"op": "clip_scale", "stock_ms": stock_scale, "ours_ms": ours_scale}]


def bench_wgrad(args) -> list[dict]:
    rows = []
    shapes = {"qkv": (args.hidden, args.hidden * 3 // 2), "fc1": (args.hidden, 2 * args.ffn),
              "fc2": (args.ffn, args.hidden)}
    for name, (fan_in, fan_out) in shapes.items():
        x = torch.randn(args.tokens, fan_in, device="cuda", dtype=torch.bfloat16)
        go = torch.randn(args.tokens, fan_out, device="cuda", dtype=torch.bfloat16)
        main_grad = torch.zeros(fan_out, fan_in, device="cuda")

        def stock():
            main_grad.add_(go.t().matmul(x))

        rows.append({"op": f"wgrad_{name}", "stock_ms": time_ms(stock, args.warmup, args.iters),
                     "ours_ms": time_ms(lambda: wgrad_gemm_accum(x, go, main_grad),
                                        args.warmup, args.iters)})
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_optimizer needs a GPU")
    rows = [bench_adam(args), *bench_norm_and_scale(args), *bench_wgrad(args)]
    print(f"wgrad route: {cuda_wgrad_route()}\n")
    print("| op | stock ms | ours ms | speed-up |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['stock_ms']:.3f} | {r['ours_ms']:.3f} | "
              f"{r['stock_ms'] / r['ours_ms']:.2f}x |")
    print(json.dumps({"args": vars(args), "wgrad_route": cuda_wgrad_route(), "rows": rows}))


if __name__ == "__main__":
    main()

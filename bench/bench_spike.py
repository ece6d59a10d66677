"""Effective bandwidth of the spiking-neuron forward: Triton kernel vs torch reference vs a device copy.

    python3 bench/bench_spike.py [--rows 16384] [--cols 3584] [--dtype bf16]

Bandwidth counts the logical bytes: x read once, y written once, plus the fp32 threshold
per row (the kernel's second pass over the row comes from L2 and is not counted). Two plain
device copies of the same tensor, measured in the same run, are the practical ceiling:
``x.clone()`` allocates its output as the kernel does, so the "% of copy" column is relative
to it; ``y.copy_(x)`` writes into a preallocated buffer. Prints a markdown table, then one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16384, help="tokens (rows of the last dim)")
    p.add_argument("--cols", type=int, default=3584, help="features per row (the threshold's reduction)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_spike: needs a CUDA/MACA GPU (torch.cuda.is_available() is False); nothing measured.",
              file=sys.stderr)
        return 1
    # run from a checkout without installing sbtrain
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.timing import time_ms
    from ops.spike.fused import fused_spike_forward
    from ops.spike.naive import naive_spike_forward

    dtype = DTYPES[args.dtype]
    x = torch.randn(args.rows, args.cols, device="cuda").to(dtype)
    y = torch.empty_like(x)
    exact = torch.equal(fused_spike_forward(x), naive_spike_forward(x))
    moved = 2 * x.numel() * x.element_size()
    impls = {
        "triton spike_activation fwd": (lambda: fused_spike_forward(x), moved + 4 * args.rows),
        "torch reference fwd": (lambda: naive_spike_forward(x), moved + 4 * args.rows),
        "copy x.clone()": (lambda: x.clone(), moved),
        "copy y.copy_(x)": (lambda: y.copy_(x), moved),
    }
    results = {}
    with torch.no_grad():
        for name, (fn, nbytes) in impls.items():
            ms = time_ms(fn, args.warmup, args.iters)
            results[name] = (ms, nbytes / ms / 1e6)
    copy_gbps = results["copy x.clone()"][1]

    device = torch.cuda.get_device_name()
    print(f"spike_activation forward, x [{args.rows}, {args.cols}] {args.dtype} on {device}; "
          f"triton == reference: {exact}\n")
    print("| impl | time (us) | GB/s | % of x.clone() |\n|---|---:|---:|---:|")
    for name, (ms, gbps) in results.items():
        print(f"| {name} | {ms * 1e3:.1f} | {gbps:.0f} | {100 * gbps / copy_gbps:.0f}% |")
    keys = {"triton spike_activation fwd": "triton", "torch reference fwd": "torch",
            "copy x.clone()": "clone", "copy y.copy_(x)": "copy"}
    record = {"bench": "spike_activation_fwd", "device": device, "rows": args.rows, "cols": args.cols,
              "dtype": args.dtype, "triton_equals_reference": exact}
    for name, (ms, gbps) in results.items():
        record[f"{keys[name]}_us"] = round(ms * 1e3, 2)
        record[f"{keys[name]}_gbps"] = round(gbps, 1)
    record["triton_fraction_of_clone"] = round(results["triton spike_activation fwd"][1] / copy_gbps, 3)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())

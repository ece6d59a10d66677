"""Output layer + cross-entropy, forward + backward: chunked ``linear_cross_entropy`` vs the unfused reference.

    python3 bench/bench_loss.py [--tokens 8192 32768 131072] [--hidden 3584] [--vocab 152064]
                                [--chunk-tokens 4096] [--dtype bf16] [--warmup 2] [--iters 5]

For each token count T (one sequence: hidden ``[T, 1, h]``, labels ``[1, T]``) both implementations
run in the same process on the same inputs: ``loss = fn(hidden, weight, labels)`` then the
gradients of hidden and weight under an upstream gradient of ``1 / T`` (a token-mean loss). Time is
the mean of ``--iters`` calls between CUDA events. Peak memory is the inputs plus the largest extra
allocation seen during one call (``torch.cuda.max_memory_allocated`` after a reset, minus what was
allocated before the call), so it does not depend on what the script holds between runs. A
reference that runs out of memory is reported as "OOM". Where both ran, the chunked results are
compared with the reference's (max |loss difference|, relative RMS error of each gradient).
TFLOP/s counts the useful work of the three GEMMs (``6 * T * h * V``), the same for both, so the
chunked op's extra forward recomputation shows up as a lower rate. Prints a markdown table, then one
JSON line. Exits with status 2 when there is no CUDA GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

# run from a checkout without installing sbtrain: `python3 bench/bench_loss.py` puts bench/ first
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import time_ms  # noqa: E402
from ops.loss import linear_cross_entropy, reference_linear_cross_entropy  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GIB = 1024**3

Outputs = tuple[Tensor, Tensor, Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 131072], help="tokens per call (s * b)")
    p.add_argument("--hidden", type=int, default=3584, help="hidden size h (SpikingBrain-7B)")
    p.add_argument("--vocab", type=int, default=152064, help="vocabulary V (SpikingBrain / Qwen2.5)")
    p.add_argument("--chunk-tokens", type=int, default=4096, help="chunk of the chunked op")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    return p.parse_args(argv)


def make_inputs(T: int, h: int, V: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """``hidden [T, 1, h]`` and ``weight [V, h]`` (leaves needing grad), labels ``[1, T]``, upstream grad."""
    hidden = torch.randn(T, 1, h, device="cuda").to(dtype).requires_grad_()
    # logits of std ~1, as a trained model's
    weight = (torch.randn(V, h, device="cuda") * h**-0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (1, T), device="cuda")
    grad_out = torch.full((1, T), 1.0 / T, device="cuda")
    return {"hidden": hidden, "weight": weight, "labels": labels, "grad_out": grad_out}


def fwd_bwd(fn: Callable[..., Tensor], x: dict[str, Tensor]) -> Outputs:
    """Losses and the gradients of hidden and weight (returned, not accumulated into ``.grad``)."""
    loss = fn(x["hidden"], x["weight"], x["labels"])
    grad_hidden, grad_weight = torch.autograd.grad(loss, (x["hidden"], x["weight"]), x["grad_out"])
    return loss.detach(), grad_hidden, grad_weight


def measure(fn: Callable[..., Tensor], x: dict[str, Tensor], warmup: int, iters: int
            ) -> tuple[Outputs, int, float] | None:
    """(outputs of one call, its peak extra bytes, mean ms per call), or None when it ran out of memory."""
    result = None
    try:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        outputs = fwd_bwd(fn, x)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        result = outputs, extra, time_ms(lambda: fwd_bwd(fn, x), warmup, iters)
    except torch.cuda.OutOfMemoryError:
        pass
    # out of the except clause the failed call's frames (and tensors) are gone: return their blocks
    gc.collect()
    torch.cuda.empty_cache()
    return result


def rel_rms(actual: Tensor, expected: Tensor, rows: int = 8192) -> float:
    """RMS of the error over the RMS of ``expected``, in fp32 blocks of rows (no full-size fp32 copy)."""
    err = ref = 0.0
    for i in range(0, expected.shape[0], rows):
        a, e = actual[i:i + rows].float(), expected[i:i + rows].float()
        err += (a - e).pow(2).sum().item()
        ref += e.pow(2).sum().item()
    return (err / ref) ** 0.5 if ref > 0 else float("nan")


def compare(chunked: Outputs, ref: Outputs) -> dict[str, float]:
    loss, dh, dw = chunked
    ref_loss, ref_dh, ref_dw = ref
    return {"max_abs_loss_diff": (loss - ref_loss).abs().max().item(),
            "grad_hidden_rel_rms": rel_rms(dh.flatten(0, 1), ref_dh.flatten(0, 1)),
            "grad_weight_rel_rms": rel_rms(dw, ref_dw)}


def bench_size(T: int, args: argparse.Namespace) -> dict[str, object]:
    """One row: time, peak memory and agreement of both implementations at T tokens."""
    dtype = DTYPES[args.dtype]
    x = make_inputs(T, args.hidden, args.vocab, dtype)
    input_bytes = sum(t.numel() * t.element_size() for t in x.values())
    impls = {"chunked": lambda h, w, y: linear_cross_entropy(h, w, y, chunk_tokens=args.chunk_tokens),
             "reference": reference_linear_cross_entropy}
    row: dict[str, object] = {"tokens": T}
    outputs, peak, ms = {}, {}, {}
    for name, fn in impls.items():
        result = measure(fn, x, args.warmup, args.iters)
        if result is None:
            row[f"{name}_ms"] = row[f"{name}_peak_gib"] = row[f"{name}_tflops"] = "OOM"
            continue
        outputs[name], extra, ms[name] = result
        peak[name] = input_bytes + extra
        row[f"{name}_ms"] = round(ms[name], 2)
        row[f"{name}_peak_gib"] = round(peak[name] / GIB, 2)
        row[f"{name}_tflops"] = round(6 * T * args.hidden * args.vocab / ms[name] / 1e9, 1)
    if len(outputs) == 2:
        row["time_ratio"] = round(ms["chunked"] / ms["reference"], 3)
        row["mem_ratio"] = round(peak["chunked"] / peak["reference"], 3)
        row.update({k: float(f"{v:.3g}") for k, v in compare(outputs["chunked"], outputs["reference"]).items()})
    del outputs, x
    gc.collect()
    torch.cuda.empty_cache()
    return row


def print_table(rows: list[dict[str, object]]) -> None:
    cols = ["tokens", "reference_ms", "chunked_ms", "time_ratio", "reference_peak_gib", "chunked_peak_gib",
            "mem_ratio", "reference_tflops", "chunked_tflops", "max_abs_loss_diff", "grad_hidden_rel_rms",
            "grad_weight_rel_rms"]
    heads = ["T", "ref ms", "chunked ms", "time chunked/ref", "ref peak GiB", "chunked peak GiB",
             "mem chunked/ref", "ref TFLOP/s", "chunked TFLOP/s", "max abs dloss", "dH rel RMS", "dW rel RMS"]
    print("| " + " | ".join(heads) + " |\n|" + "---:|" * len(heads))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "-")) for c in cols) + " |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_loss needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    rows = [bench_size(T, args) for T in args.tokens]
    device = torch.cuda.get_device_name()
    print(f"linear_cross_entropy fwd+bwd, hidden {args.hidden}, vocab {args.vocab}, {args.dtype}, "
          f"chunk_tokens {args.chunk_tokens}, on {device}\n")
    print_table(rows)
    record = {"bench": "linear_cross_entropy_fwd_bwd", "device": device, "hidden": args.hidden,
              "vocab": args.vocab, "dtype": args.dtype, "chunk_tokens": args.chunk_tokens, "rows": rows}
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())

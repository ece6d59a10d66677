"""Output layer + cross-entropy, forward + backward: Megatron's path vs ``ops.loss``'s torch and Triton backends.

    python3 bench/bench_loss.py [--tokens 8192 32768 131072] [--hidden 3584] [--vocab 152064]
                                [--chunk-tokens 8192] [--dtype bf16] [--warmup 2] [--iters 5]
                                [--impls megatron chunked triton] [--main-grad]

For each token count T (one sequence: hidden ``[T, 1, h]``, labels ``[1, T]``) the implementations
run in the same process on the same inputs: ``loss = fn(hidden, weight, labels)`` then the
gradients of hidden and weight under an upstream gradient of ``1 / T`` (a token-mean loss):

- ``megatron``: Megatron-Core's default output path at tp 1: ``logits = hidden @ weight.T`` (bf16,
  what ``ColumnParallelLinear`` computes, autograd for its backward) and
  ``tensor_parallel.vocab_parallel_cross_entropy`` (fp32 copy of the logits, fp32 softmax saved
  for backward, fp32 gradient) on a one-rank process group;
- ``chunked``: ``ops.loss.linear_cross_entropy``'s torch backend (``torch_chunked``);
- ``triton``: its Triton backend (bf16 logits, fp32 kernels, in-place gradient), what training
  uses on GPUs (``train.loss_chunk_tokens: auto``, chunk 8192).

Time is the mean of ``--iters`` calls between CUDA events. Peak memory is the inputs plus the
largest extra allocation seen during one call (``torch.cuda.max_memory_allocated`` after a reset,
minus what was allocated before the call). An implementation that runs out of memory is reported
as "OOM". Each ``ops.loss`` backend is compared with Megatron's results where both ran (max |loss
difference|, relative RMS error of each gradient). TFLOP/s counts the useful work of the three
GEMMs (``6 * T * h * V``), so the ``ops.loss`` backends' forward recomputation shows up as a lower
rate. Prints a markdown table, then one JSON line. Exits with status 2 when there is no CUDA GPU.

``--main-grad`` adds an A/B of the weight-gradient path under Megatron DDP for the ``ops.loss``
backends (``chunked``, ``triton``): the weight is a parameter with an fp32 ``main_grad`` and
megatron-core's own DDP backward hook (``tests/ops/ddp_hooks.py``); ``unfused`` returns the bf16
``dW`` (an fp32 ``[V, h]`` sum cast to bf16) that the hook adds into ``main_grad``, ``fused``
(``grad_accum_fusion=True``, what training does on CUDA) accumulates each chunk straight into
``main_grad``. Time and peak memory per fwd+bwd call, and the relative RMS difference of the two
``main_grad`` after one call each.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

# run from a checkout without installing sbtrain: `python3 bench/bench_loss.py` puts bench/ first
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy  # noqa: E402

from bench.timing import time_ms  # noqa: E402
from maca_compat.platform import get_platform  # noqa: E402
from ops.loss import linear_cross_entropy  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("megatron", "chunked", "triton")
BASELINE = "megatron"
GIB = 1024**3

Outputs = tuple[Tensor, Tensor, Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 131072], help="tokens per call (s * b)")
    p.add_argument("--hidden", type=int, default=3584, help="hidden size h (SpikingBrain-7B)")
    p.add_argument("--vocab", type=int, default=152064, help="vocabulary V (SpikingBrain / Qwen2.5)")
    p.add_argument("--chunk-tokens", type=int, default=8192,
                   help="chunk of the ops.loss backends (8192: train.loss_chunk_tokens auto)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--main-grad", action="store_true",
                   help="also A/B the fused vs unfused weight-gradient path under DDP's main_grad")
    return p.parse_args(argv)


def one_rank_group() -> dist.ProcessGroup:
    """A process group of this process alone: Megatron's cross-entropy all-reduces over tp."""
    if not dist.is_initialized():
        store = dist.FileStore(tempfile.mktemp(prefix="bench_loss_store_"), 1)
        dist.init_process_group(get_platform().comm_backend, store=store, rank=0, world_size=1)
    return dist.group.WORLD


def megatron_loss(group: dist.ProcessGroup) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """Megatron's output layer + ``compute_language_model_loss`` at tp 1, as GPTModel runs them."""

    def loss(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        logits = torch.matmul(hidden, weight.t())
        per_token = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous(), tp_group=group)
        return per_token.transpose(0, 1).contiguous()

    return loss


def implementations(args: argparse.Namespace) -> dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """The benchmarked functions ``(hidden, weight, labels) -> losses``, by name."""
    backends = {b.name: b.fn for b in linear_cross_entropy.registry.backends}
    chunk = args.chunk_tokens
    every = {"chunked": lambda h, w, y: backends["torch_chunked"](h, w, y, chunk),
             "triton": lambda h, w, y: backends["triton"](h, w, y, chunk)}
    if BASELINE in args.impls:
        every[BASELINE] = megatron_loss(one_rank_group())
    return {name: every[name] for name in args.impls}


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


def compare(outputs: Outputs, baseline: Outputs) -> dict[str, float]:
    loss, dh, dw = outputs
    ref_loss, ref_dh, ref_dw = baseline
    return {"max_abs_loss_diff": (loss - ref_loss).abs().max().item(),
            "dh_rel_rms": rel_rms(dh.flatten(0, 1), ref_dh.flatten(0, 1)),
            "dw_rel_rms": rel_rms(dw, ref_dw)}


def bench_size(T: int, args: argparse.Namespace, impls: dict[str, Callable[..., Tensor]]) -> dict[str, object]:
    """One row: time, peak memory and agreement with Megatron of every implementation at T tokens."""
    x = make_inputs(T, args.hidden, args.vocab, DTYPES[args.dtype])
    input_bytes = sum(t.numel() * t.element_size() for t in x.values())
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
        if name != BASELINE and BASELINE in outputs:
            row[f"{name}_time_vs_megatron"] = round(ms[name] / ms[BASELINE], 3)
            row[f"{name}_mem_vs_megatron"] = round(peak[name] / peak[BASELINE], 3)
            agreement = compare(outputs[name], outputs[BASELINE])
            row.update({f"{name}_{k}": float(f"{v:.3g}") for k, v in agreement.items()})
        if name != BASELINE:
            # keep the baseline's outputs only: the others' gradients would double the held memory
            outputs.pop(name)
    del outputs, x
    gc.collect()
    torch.cuda.empty_cache()
    return row


def bench_main_grad(T: int, args: argparse.Namespace) -> list[dict[str, object]]:
    """Unfused (bf16 dW + DDP's add) vs fused (chunks into main_grad) for each ``ops.loss`` backend."""
    from tests.ops.ddp_hooks import DDPGrads  # megatron-core's DDP hook on one parameter

    backends = {b.name: b.fn for b in linear_cross_entropy.registry.backends}
    x = make_inputs(T, args.hidden, args.vocab, DTYPES[args.dtype])
    weight = torch.nn.Parameter(x["weight"].detach())
    DDPGrads([weight], overlap_grad_reduce=False)
    rows = []
    for impl, backend in (("chunked", "torch_chunked"), ("triton", "triton")):
        grads = {}
        for mode, fusion in (("unfused", False), ("fused", True)):
            def step():
                x["hidden"].grad = None
                weight.grad_added_to_main_grad = False  # as DDP's zero_grad_buffer, every step
                loss = backends[backend](x["hidden"], weight, x["labels"], args.chunk_tokens,
                                         grad_accum_fusion=fusion)
                (loss * x["grad_out"]).sum().backward()
            weight.main_grad.zero_()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - before
            grads[mode] = weight.main_grad.clone()
            ms = time_ms(step, args.warmup, args.iters)
            rows.append({"tokens": T, "impl": impl, "mode": mode, "ms": round(ms, 2),
                         "extra_gib": round(extra / GIB, 2)})
        rows[-1]["main_grad_rel_rms_vs_unfused"] = float(f"{rel_rms(grads['fused'], grads['unfused']):.3g}")
        del grads
    del x, weight
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict[str, object]], names: list[str]) -> None:
    """One line per (T, implementation): time, peak, rate, and agreement with Megatron."""
    cols = ["ms", "peak_gib", "tflops", "time_vs_megatron", "mem_vs_megatron", "max_abs_loss_diff",
            "dh_rel_rms", "dw_rel_rms"]
    heads = ["T", "impl", "ms", "peak GiB", "TFLOP/s", "time / megatron", "mem / megatron", "max abs dloss vs megatron",
             "dH rel RMS vs megatron", "dW rel RMS vs megatron"]
    print("| " + " | ".join(heads) + " |\n|" + "---:|" * len(heads))
    for row in rows:
        for name in names:
            cells = [str(row["tokens"]), name] + [str(row.get(f"{name}_{c}", "-")) for c in cols]
            print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_loss needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    impls = implementations(args)
    rows = [bench_size(T, args, impls) for T in args.tokens]
    device = torch.cuda.get_device_name()
    print(f"output layer + cross-entropy fwd+bwd, hidden {args.hidden}, vocab {args.vocab}, {args.dtype}, "
          f"ops.loss chunk_tokens {args.chunk_tokens}, on {device}\n")
    print_table(rows, list(impls))
    record = {"bench": "linear_cross_entropy_fwd_bwd", "device": device, "hidden": args.hidden,
              "vocab": args.vocab, "dtype": args.dtype, "chunk_tokens": args.chunk_tokens, "rows": rows}
    print(json.dumps(record))
    if args.main_grad:
        mg_rows = [row for T in args.tokens for row in bench_main_grad(T, args)]
        print("\nweight gradient into DDP's fp32 main_grad: unfused (bf16 dW + DDP add) vs fused\n")
        print("| T | impl | mode | ms | extra GiB | main_grad rel RMS fused vs unfused |\n|---:|---:|---:|---:|---:|---:|")
        for row in mg_rows:
            print(f"| {row['tokens']} | {row['impl']} | {row['mode']} | {row['ms']} | {row['extra_gib']} | "
                  f"{row.get('main_grad_rel_rms_vs_unfused', '-')} |")
        print(json.dumps({"bench": "linear_cross_entropy_main_grad", "device": device, "rows": mg_rows}))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

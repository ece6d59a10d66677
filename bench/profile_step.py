"""Profile training steps with ``torch.profiler`` and say where the step time goes.

    torchrun --standalone --nproc_per_node=1 bench/profile_step.py CONFIG [--set k=v ...]
             [--warmup 2] [--steps 2] [--out DIR] [--trace]

Builds the run exactly as ``sbtrain train`` does (same config, same overrides), trains
``--warmup`` steps untraced (compilation, autotuning), then ``--steps`` steps under the
profiler. Prints and writes (``DIR/profile_breakdown.json``, ``DIR/top_kernels.txt``):
- the top kernels by self device time;
- device time per part of the step (matmuls, softmax attention, GLA kernels, optimizer,
  loss, communication, copies, other elementwise), each kernel classified by its name;
- device idle time (wall time of the traced steps minus the union of kernel intervals);
- host-side synchronisations (``aten::item``, ``aten::_local_scalar_dense``, ``cudaStreamSynchronize``,
  ``cudaDeviceSynchronize``) with their counts and host time.
``--trace`` also writes the Chrome trace of rank 0 (large; gzip it before moving it around).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sbtrain.config import load_config  # noqa: E402

# First match wins; patterns are matched against the lower-cased kernel name.
PARTS: list[tuple[str, str]] = [
    ("communication", r"nccl|all_?reduce|all_?gather|reduce_?scatter|alltoall|sendrecv"),
    ("optimizer", r"multi_tensor|adam|foreach|l2norm|_amp_|lamb"),
    ("gla (fla)", r"chunk_|fused_recurrent|gla|chunk_local_cumsum|chunk_fwd|chunk_bwd|fla"),
    ("softmax attention", r"flash|fmha|flex|attention|sdpa|triton_tem_fused"),
    ("loss / logits", r"cross_entropy|log_softmax|nll_loss|softmax_backward|logsumexp"),
    ("matmul", r"gemm|cutlass|sm90_xmma|nvjet|cublas|matmul|wgmma|sm80_xmma|ampere_|hopper"),
    ("copy / cast", r"copy|cast|convert|memcpy|memset|fill"),
    ("spike neuron", r"spike"),
    ("moe routing / permute", r"topk|sort|scatter|gather|index|histc|bincount|cumsum|permute"),
]
SYNC_EVENTS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize",
               "cudaDeviceSynchronize", "cudaMemcpyAsync", "aten::nonzero", "aten::tolist")


def classify(name: str) -> str:
    low = name.lower()
    for part, pattern in PARTS:
        if re.search(pattern, low):
            return part
    return "other elementwise / reductions"


def _device_events(prof) -> list:
    events = []
    for e in prof.events():
        on_device = getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type)
        # user annotations (``Optimizer.step#AdamW.step``, ``ProfilerStep#3``) are mirrored on the
        # device timeline as ranges around kernels: counting them would count those kernels twice
        if on_device and "#" not in e.name:
            events.append(e)
    return events


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def summarise(prof, wall_s: float, steps: int) -> dict:
    kernels = _device_events(prof)
    per_part: dict[str, float] = {}
    per_kernel: dict[str, list[float]] = {}
    intervals = []
    for e in kernels:
        us = e.time_range.end - e.time_range.start
        intervals.append((e.time_range.start, e.time_range.end))
        per_part[classify(e.name)] = per_part.get(classify(e.name), 0.0) + us
        stat = per_kernel.setdefault(e.name, [0.0, 0])
        stat[0] += us
        stat[1] += 1
    busy_us = _union_length(intervals)
    syncs: dict[str, list[float]] = {}
    for e in prof.key_averages():
        if e.key in SYNC_EVENTS:
            syncs[e.key] = [e.count / steps, e.cpu_time_total / 1e3 / steps]
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:40]
    step_ms = 1e3 * wall_s / steps
    return {
        "step_ms": step_ms,
        "device_busy_ms": busy_us / 1e3 / steps,
        "device_idle_ms": step_ms - busy_us / 1e3 / steps,
        "parts_ms": {k: v / 1e3 / steps for k, v in sorted(per_part.items(), key=lambda kv: -kv[1])},
        "host_syncs_per_step": {k: {"count": c, "host_ms": ms} for k, (c, ms) in syncs.items()},
        "top_kernels": [{"name": n[:160], "ms": t / 1e3 / steps, "calls": c / steps,
                         "part": classify(n)} for n, (t, c) in top],
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default="runs/profile")
    parser.add_argument("--trace", action="store_true")
    args = parser.parse_args(argv)
    from sbtrain.trainer import Trainer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, args.overrides + [
        f"train.train_iters={args.warmup + args.steps}", "train.eval_interval=0",
        f"train.run_dir={out / 'run'}"])
    trainer = Trainer(cfg, source=args.config)
    state = trainer.setup()
    first = time.perf_counter()
    for step in range(args.warmup):
        trainer.train_step(step)
        _sync()
        if step == 0:
            print(f"first step (compile + autotune): {time.perf_counter() - first:.1f} s",
                  flush=True)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for step in range(args.warmup, args.warmup + args.steps):
            trainer.train_step(step)
        _sync()
        wall = time.perf_counter() - start
    summary = summarise(prof, wall, args.steps)
    summary.update(config=args.config, overrides=args.overrides,
                   tokens_per_step=cfg.train.seq_length * cfg.train.global_batch_size,
                   device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   torch=torch.__version__)
    if state.groups.rank == 0:
        (out / "profile_breakdown.json").write_text(json.dumps(summary, indent=1))
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40,
                                          max_name_column_width=90)
        (out / "top_kernels.txt").write_text(table)
        if args.trace:
            prof.export_chrome_trace(str(out / "trace.json"))
        print(json.dumps({k: summary[k] for k in ("step_ms", "device_busy_ms", "device_idle_ms",
                                                  "parts_ms", "host_syncs_per_step")}, indent=1))
        for k in summary["top_kernels"][:25]:
            print(f"{k['ms']:9.2f} ms {k['calls']:6.0f}x  [{k['part']}] {k['name'][:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

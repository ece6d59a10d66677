"""Training-step benchmark: hybrid (GLA + SWA) vs all-softmax layouts, spiking off/on, per platform.

    python3 bench/bench_model.py [--layers 8] [--seqs 8192 32768] [--steps 6]
                                 [--spiking off|on|both] [--only hybrid|softmax]
                                 [--global-batch N] [--recompute none|selective|full|auto]
                                 [--platforms default maca] [--loss-chunk N] [--set KEY=VALUE ...]
                                 [--config YAML --nproc N] [--out DIR]

Each case is one real ``sbtrain.train`` launch on this machine's GPUs (synthetic data, bf16,
micro-batch 1). Without ``--config`` the cases are two layouts at SpikingBrain-7B width (hidden
3584, 28/4 heads, FFN 18944, vocab 152064) on one GPU: ``hybrid`` (SpikingBrain-7B's
alternation) and ``softmax`` (the Qwen2 layout). With ``--config`` the YAML itself is the case
(e.g. ``examples/configs/spikingbrain_7b.yaml --nproc 2``, the 76B configs), with synthetic data
and no checkpoint loading or saving; ``--set`` overrides either. The profiler's ``profile.json``
gives tokens/s, TGS, MFU (model FLOPs vs the device peak) and peak memory; the first step is
left out as warm-up and reported separately, with the wall time from launch to the end of step 1
(fla autotuning and compilation show up there; see ops/gla/tuning.py).

``--global-batch N`` accumulates N micro-batches of 1 per step (tokens/s then counts N sequences
per step). ``--recompute`` passes ``train.recompute`` (default ``full``, the shipped configs').
``--platforms default maca`` runs every case twice, the second time with ``SB_PLATFORM=maca``:
only the Triton and torch paths a MetaX GPU runs (``Backend.platforms`` in ops/backends.py), and
adds each maca run's MFU relative to the default run.

``--spiking both`` runs every case with the neuron off and on (``spiking.enabled``) and adds
the spiking overhead in step time (issue 7 targets <= 3% for the hybrid). Spiking runs log only
their last step (a logged step also counts firing statistics, an extra pass). ``--loss-chunk
4096`` computes the loss 4096 tokens' logits at a time (``train.loss_chunk_tokens``); a run that
runs out of memory is reported as OOM. Prints a markdown table and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sbtrain.config.load import stage_names  # noqa: E402

WIDTH_7B = {"model.hidden_size": 3584, "model.num_attention_heads": 28,
            "model.num_query_groups": 4, "model.ffn_hidden_size": 18944,
            "model.vocab_size": 152064, "model.max_position_embeddings": 131072,
            "model.sliding_window": 4096}
# --config cases: synthetic tokens, nothing loaded or saved
CONFIG_CASE_SETS = {"data.kind": "synthetic", "checkpoint.pretrained": "''", "checkpoint.save_dir": "''",
                    "checkpoint.load_dir": "''", "train.eval_interval": 0}
PLATFORMS = ("default", "maca")


@dataclass
class Case:
    """One training launch."""

    name: str
    config: Path
    sets: dict = field(default_factory=dict)
    nproc: int = 1
    platform: str = "default"
    seq: int = 0
    spiking: bool = False
    stage: str | None = None

    @property
    def key(self) -> str:
        tags = [self.name, str(self.seq) if self.seq else "", "spiking" if self.spiking else "",
                "maca" if self.platform == "maca" else ""]
        return "_".join(t for t in tags if t)


def layouts(layers: int) -> dict[str, str]:
    """Hybrid = SpikingBrain-7B's alternation; baseline = the Qwen2 all-softmax layout."""
    return {"hybrid": "L-W-" * (layers // 2), "softmax": "*-" * layers}


def layout_cases(args: argparse.Namespace) -> list[Case]:
    cases = []
    for seq in args.seqs or [8192, 32768]:
        for name, pattern in layouts(args.layers).items():
            if args.only not in (None, name):
                continue
            for spiking in args.spiking_modes:
                sets = {**WIDTH_7B, "model.pattern": pattern, "train.seq_length": seq,
                        "spiking.enabled": spiking, "train.precision": "bf16", "train.eval_interval": 0,
                        "train.log_interval": args.steps if spiking else 1, "data.kind": "synthetic",
                        "train.loss_chunk_tokens": args.loss_chunk, "train.recompute": args.recompute or "full"}
                cases += [Case(name, REPO / "examples/configs/tiny.yaml", sets, 1, platform, seq, spiking)
                          for platform in args.platforms]
    return cases


def config_cases(args: argparse.Namespace) -> list[Case]:
    config = Path(args.config).resolve()
    stages = stage_names(config)
    stage = args.stage or (stages[0] if stages else None)
    sets = dict(CONFIG_CASE_SETS)
    if args.recompute:
        sets["train.recompute"] = args.recompute
    if args.loss_chunk != "auto":
        sets["train.loss_chunk_tokens"] = args.loss_chunk
    cases = []
    for seq in args.seqs or [0]:
        for spiking in args.spiking_modes if args.spiking != "off" else [None]:
            extra = {"train.seq_length": seq} if seq else {}
            if spiking is not None:
                extra["spiking.enabled"] = spiking
            cases += [Case(config.stem, config, {**sets, **extra}, args.nproc, platform, seq, bool(spiking),
                           stage) for platform in args.platforms]
    return cases


def launch_sets(case: Case, args: argparse.Namespace, run_dir: Path) -> dict:
    """Every --set of one launch: the case's, the common ones, then the user's (which win)."""
    sets = {**case.sets, "train.micro_batch_size": 1, "train.global_batch_size": args.global_batch,
            "train.train_iters": args.steps, "train.run_dir": str(run_dir)}
    for item in args.set:
        key, _, value = item.partition("=")
        sets[key] = value
    return sets


def run_one(case: Case, args: argparse.Namespace, out: Path) -> dict:
    run_dir = out / case.key
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "profile.json"):
        (run_dir / stale).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={case.nproc}",
           "-m", "sbtrain.train", str(case.config)] + (["--stage", case.stage] if case.stage else [])
    for key, value in launch_sets(case, args, run_dir).items():
        cmd += ["--set", f"{key}={value}"]
    what = f"stage {case.stage}" if case.stage else case.sets.get("model.pattern", "")
    print(f"== {case.key}: {case.config.name} x{case.nproc} {what}", flush=True)
    proc, step1_s = _run_timed(cmd, run_dir, _environment(case.platform))
    base = {"name": case.name, "seq": case.seq, "spiking": case.spiking, "platform": case.platform,
            "launch_to_step1_s": step1_s}
    log = (run_dir / "log.txt").read_text()
    if proc.returncode != 0 or not (run_dir / "profile.json").is_file():
        errors = [line for line in log.splitlines() if "Error" in line or "error:" in line]
        oom = any("out of memory" in line.lower() for line in errors)
        print(f"   failed ({'OOM' if oom else proc.returncode}); log: {run_dir / 'log.txt'}\n"
              + "\n".join(errors[-8:]))
        return {**base, "error": "OOM" if oom else f"exit {proc.returncode}"}
    summary = json.loads((run_dir / "profile.json").read_text())
    result = {**base, "tokens_per_s": summary["tokens_per_s"]["median"], "tgs": summary["tgs"]["median"],
              "mfu": summary["mfu"]["median"], "peak_gib": summary["peak_memory_gib"],
              "step_s": summary["step_time_s"]["median"],
              "first_step_s": summary["history"][0]["step_time_s"] if summary.get("history") else None,
              "peak_source": summary["peak_source"]}
    print(f"   {result}", flush=True)
    return result


def _environment(platform: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("SB_PLATFORM", None)
    if platform == "maca":
        env["SB_PLATFORM"] = "maca"
    # at 64K-128K tokens the caching allocator's fragmentation alone decides OOM or not
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return env


def _run_timed(cmd: list[str], run_dir: Path, env: dict) -> tuple[subprocess.CompletedProcess, float | None]:
    """Run ``cmd`` (output to run_dir/log.txt); also return the seconds from launch until step 1's
    metrics.jsonl line appears (the trainer writes it right after the step)."""
    metrics = run_dir / "metrics.jsonl"
    start, step1 = time.perf_counter(), None
    with open(run_dir / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        while proc.poll() is None:
            if step1 is None and metrics.is_file() and metrics.stat().st_size:
                step1 = time.perf_counter() - start
            time.sleep(0.2)
    return subprocess.CompletedProcess(cmd, proc.returncode), step1


def table(results: list[dict]) -> str:
    """One row per run; hybrid/softmax compares equal spiking and platform, the overhead compares
    spiking off/on, maca/default compares MFU on the two platforms."""
    by = {(r["name"], r["seq"], r["spiking"], r["platform"]): r for r in results}
    lines = ["| seq | case | platform | spiking | tokens/s | TGS | step s | MFU | peak GiB | step 1 s "
             "| launch→step 1 s | hybrid/softmax tokens/s | spiking overhead | MFU vs default |",
             "|" + "---|" * 14]
    for r in results:
        flag = "on" if r["spiking"] else "off"
        seq = r["seq"] or "config"
        head = f"| {seq} | {r['name']} | {r['platform']} | {flag} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} |" + " |" * 9)
            continue
        first = f"{r['first_step_s']:.1f}" if r.get("first_step_s") is not None else ""
        launch = f"{r['launch_to_step1_s']:.0f}" if r.get("launch_to_step1_s") is not None else ""
        softmax = by.get(("softmax", r["seq"], r["spiking"], r["platform"]))
        lines.append(f"{head} {r['tokens_per_s']:,.0f} | {r['tgs']:,.0f} | {r['step_s']:.3f} | "
                     f"{100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} | {first} | {launch} | "
                     f"{_ratio(r, softmax, 'tokens_per_s', r['name'] == 'hybrid')} | "
                     f"{_overhead(r, by.get((r['name'], r['seq'], False, r['platform'])), r['spiking'])} | "
                     f"{_ratio(r, by.get((r['name'], r['seq'], r['spiking'], 'default')), 'mfu', r['platform'] != 'default')} |")
    return "\n".join(lines)


def _ratio(run: dict, other: dict | None, metric: str, wanted: bool) -> str:
    if not wanted or not other or not other.get(metric):
        return ""
    return f"{run[metric] / other[metric]:.2f}x"


def _overhead(on: dict, off: dict | None, wanted: bool) -> str:
    """Step time with the neuron relative to the same case without it."""
    if not wanted or not off or "step_s" not in off:
        return ""
    return f"{100 * (on['step_s'] / off['step_s'] - 1):+.1f}%"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="layers (even) of both layouts")
    parser.add_argument("--seqs", type=int, nargs="+", default=None,
                        help="sequence lengths (default: 8192 32768; with --config: the config's)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--only", choices=["hybrid", "softmax"], default=None)
    parser.add_argument("--spiking", choices=["off", "on", "both"], default="off",
                        help="run with the spiking neuron off, on, or both (overhead column)")
    parser.add_argument("--global-batch", type=int, default=1,
                        help="sequences per step, accumulated as micro-batches of 1")
    parser.add_argument("--recompute", default=None,
                        help="train.recompute policy (none|selective|full|auto); default: full, "
                             "with --config the config's")
    platforms = parser.add_mutually_exclusive_group()
    platforms.add_argument("--platforms", nargs="+", choices=PLATFORMS, default=["default"],
                           help="'default maca' runs each case on both (maca: SB_PLATFORM=maca)")
    platforms.add_argument("--platform", choices=PLATFORMS, dest="platform_one",
                           help="one platform (same as --platforms X)")
    parser.add_argument("--loss-chunk", default="auto",
                        help="train.loss_chunk_tokens: auto (training's default: ops.loss on GPUs "
                        "with tp 1), 0 (whole logits, Megatron's loss) or tokens per chunk")
    parser.add_argument("--config", default=None, help="benchmark this YAML instead of the two layouts")
    parser.add_argument("--nproc", type=int, default=1, help="with --config: GPUs (processes)")
    parser.add_argument("--stage", default=None, help="with --config: stage to run (default: the first)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every launch (repeatable)")
    parser.add_argument("--out", default="runs/bench_model")
    args = parser.parse_args(argv)
    if args.platform_one:
        args.platforms = [args.platform_one]
    if args.nproc != 1 and not args.config:
        parser.error("--nproc needs --config (the layout cases run on one GPU)")
    if args.global_batch < 1:
        parser.error("--global-batch must be >= 1")
    args.spiking_modes = {"off": [False], "on": [True], "both": [False, True]}[args.spiking]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_model needs a CUDA/MACA GPU", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cases = config_cases(args) if args.config else layout_cases(args)
    results = [run_one(case, args, out) for case in cases]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    what = args.config or f"{args.layers} layers at 7B width"
    print(f"\n{torch.cuda.get_device_name()} | {what} | global batch {args.global_batch} | recompute "
          f"{args.recompute or 'full' if not args.config else args.recompute or 'config'} | loss chunk "
          f"{args.loss_chunk}\n")
    print(table(results))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

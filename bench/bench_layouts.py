"""Parallel layouts against one device: same loss curve, tokens/s per device, scaling efficiency.

    python3 bench/bench_layouts.py [CONFIG] [--layouts NAME ...] [--steps 20] [--tol 0.05]
                                   [--overlap auto|off|both] [--sp-blocking-too]
                                   [--set section.key=value ...] [--out DIR]

Each layout is one ``torchrun --standalone -m sbtrain.train CONFIG`` launch on this host with
its parallel sizes set by ``--set``; ``one`` (every size 1, a single device) is always run
first as the reference. Per layout the table gives the largest per-step loss difference from
``one``, median tokens/s per device (TGS) and MFU from the bundled profiler, and the scaling
efficiency ``tokens/s of the layout / (devices x tokens/s of one)``, and the exposed
data-parallel reduction's share of the step (the profiler's ``grad_reduce`` section: the
gradient reduction left after backward, all of it without overlap). The other communication
(pipeline sends, the expert all-to-all, the sequence-parallel exchanges) runs inside forward
and backward and shows only as lost scaling efficiency.

``--overlap``: ``auto`` (the config's parallel.overlap_*: on GPUs on), ``off`` (both off), or
``both``: every layout twice, ``NAME`` (auto) and ``NAME+no_overlap``, to measure what Megatron's
bucketed overlap of the DP reduce-scatter / parameter all-gather saves.

``--sp-blocking-too``: every sp layout (and variant) also runs as ``NAME+sp_blocking`` with
``parallel.sp_early_exchange=false``, the A/B of issuing the sequence-parallel exchanges
before the local kernels (docs/sequence_parallel.md, "Overlap"); same losses expected.

Tolerance: on GPUs in bf16 the layouts reduce in different orders (gradient all-reduce,
expert all-to-all, sequence-parallel state exchange), so the curves agree to bf16 rounding
accumulated over the steps, not bit for bit: ``--tol`` (default 0.05 absolute on a loss near
ln(vocab)) bounds that drift; fp32 runs on CPU agree to ~1e-6. A layout beyond the tolerance
makes the script exit 1.

Layouts (``--layouts`` picks by name; the default is the 2-device set). 2 devices (issue
18): dp2, dp2_ep2 (dp 2, ep 2), pp2, sp2, sp2_ep2 (sp 2, ep 2: the experts split over the
sequence ranks). 4 and 8 devices (issue 8): dp4_ep2, pp2_dp2_ep2, sp2_dp2, dp4_pp2_ep2. The ep
layouts are skipped for a model without MoE layers; sp needs a sequence length that divides
by 2. Writes ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # sbtrain from this checkout, installed or not
from sbtrain.config import load_config  # noqa: E402
SINGLE = {"parallel.dp": 1, "parallel.pp": 1, "parallel.tp": 1, "parallel.ep": 1, "parallel.sp": 1}
LAYOUTS: dict[str, tuple[int, dict]] = {
    "dp2": (2, {"parallel.dp": 2}),
    "dp2_ep2": (2, {"parallel.dp": 2, "parallel.ep": 2}),
    "pp2": (2, {"parallel.pp": 2}),
    "sp2": (2, {"parallel.sp": 2}),
    "sp2_ep2": (2, {"parallel.sp": 2, "parallel.ep": 2}),
    "dp4_ep2": (4, {"parallel.dp": 4, "parallel.ep": 2}),
    "pp2_dp2_ep2": (4, {"parallel.dp": 2, "parallel.pp": 2, "parallel.ep": 2}),
    "sp2_dp2": (4, {"parallel.dp": 2, "parallel.sp": 2}),
    "dp4_pp2_ep2": (8, {"parallel.dp": 4, "parallel.pp": 2, "parallel.ep": 2}),
}
TWO_DEVICES = ["dp2", "dp2_ep2", "pp2", "sp2", "sp2_ep2"]
NO_OVERLAP = {"parallel.overlap_grad_reduce": "false", "parallel.overlap_param_gather": "false"}
SP_BLOCKING = {"parallel.sp_early_exchange": "false"}


def launch(config: str, name: str, nproc: int, sets: dict, out: Path, env: dict) -> dict:
    """Train one layout; returns its per-step losses and the profiler's medians."""
    run_dir = out / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "sbtrain.train", config]
    for key, value in {**sets, "train.run_dir": run_dir, "train.log_interval": 1}.items():
        cmd += ["--set", f"{key}={value}"]
    print(f"== {name}: {nproc} device(s) {sets}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(f"   failed ({proc.returncode}); log: {run_dir / 'log.txt'}", flush=True)
        return {"name": name, "devices": nproc, "error": f"exit {proc.returncode}"}
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    profile = json.loads((run_dir / "profile.json").read_text())
    reduce_s = profile["sections_s"].get("grad_reduce", {}).get("median", 0.0)
    return {"name": name, "devices": nproc, "losses": [s["loss"] for s in steps],
            "tokens_per_s": profile["tokens_per_s"]["median"], "tgs": profile["tgs"]["median"],
            "mfu": profile["mfu"]["median"], "peak_gib": profile["peak_memory_gib"],
            "grad_reduce_share": reduce_s / profile["step_time_s"]["median"]}


def compare(reference: dict, result: dict) -> dict:
    """Adds the loss drift from the reference and the scaling efficiency."""
    if "error" in result or "error" in reference:
        return result
    drift = max(abs(a - b) for a, b in zip(reference["losses"], result["losses"]))
    efficiency = result["tokens_per_s"] / (result["devices"] * reference["tokens_per_s"])
    return {**result, "max_loss_diff": drift, "scaling_efficiency": efficiency}


def table(results: list[dict]) -> str:
    lines = ["| layout | devices | max loss diff vs one | tokens/s per device | MFU | "
             "scaling efficiency | exposed grad reduce | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['devices']} | {r['error']} | | | | | |")
            continue
        drift = f"{r['max_loss_diff']:.2e}" if "max_loss_diff" in r else "(reference)"
        efficiency = f"{100 * r['scaling_efficiency']:.0f}%" if "scaling_efficiency" in r else ""
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else ""
        lines.append(f"| {r['name']} | {r['devices']} | {drift} | {r['tgs']:,.0f} | "
                     f"{100 * r['mfu']:.1f}% | {efficiency} | "
                     f"{100 * r['grad_reduce_share']:.1f}% of step | {peak} |")
    return "\n".join(lines)


def variants(name: str, overlap: str, sp_blocking_too: bool) -> list[tuple[str, dict]]:
    """The (label, extra overrides) runs of one layout under ``--overlap`` and ``--sp-blocking-too``."""
    runs = {"auto": [(name, {})], "off": [(name, NO_OVERLAP)],
            "both": [(name, {}), (f"{name}+no_overlap", NO_OVERLAP)]}[overlap]
    if sp_blocking_too and "sp" in name:
        runs += [(f"{label}+sp_blocking", {**extra, **SP_BLOCKING}) for label, extra in runs]
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="examples/configs/spikingbrain_76b_tiny.yaml")
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=TWO_DEVICES)
    parser.add_argument("--overlap", choices=["auto", "off", "both"], default="auto",
                        help="DP communication overlap of the multi-device runs (see above)")
    parser.add_argument("--sp-blocking-too", action="store_true",
                        help="sp layouts also with parallel.sp_early_exchange=false (see above)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tol", type=float, default=0.05)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every layout (e.g. train.seq_length=128)")
    parser.add_argument("--out", default="runs/bench_layouts")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = dict(item.split("=", 1) for item in args.set)
    common.update({"train.train_iters": args.steps, "train.eval_interval": 0,
                   "checkpoint.save_dir": "''", "checkpoint.pretrained": "''"})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    reference = launch(args.config, "one", 1, {**common, **SINGLE}, out, env)
    results = [reference]
    has_moe = load_config(args.config, [f"{k}={v}" for k, v in common.items()]).model.has_moe
    for name in args.layouts:
        nproc, sets = LAYOUTS[name]
        if "ep" in name and not has_moe:
            print(f"== {name}: skipped, the model has no MoE layers", flush=True)
            continue
        for label, extra in variants(name, args.overlap, args.sp_blocking_too):
            results.append(compare(reference, launch(
                args.config, label, nproc, {**common, **SINGLE, **sets, **extra}, out, env)))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{args.config}, {args.steps} steps\n\n{table(results)}\n{json.dumps(results)}")
    failed = [r for r in results if "error" in r or r.get("max_loss_diff", 0.0) > args.tol]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

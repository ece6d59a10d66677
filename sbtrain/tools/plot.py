"""``sbtrain plot RUN_DIR [RUN_DIR ...]``: loss, eval loss, lr, grad norm, tokens/s and MFU of
one or more runs, overlaid in one PNG, from each run's ``metrics.jsonl``.

A resumed run appends to the same file: its first record carries ``resumed_from`` and the
steps after it may repeat steps the interrupted run had already logged past its last
checkpoint. The curve keeps, for every step, the record written last (the one the resumed
run continued from), and marks each resume with a dotted vertical line.

matplotlib is imported on use through its object API (``Figure`` + Agg canvas): no global
backend is selected and no display is needed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

METRICS = "metrics.jsonl"
# (record key, panel title, scale applied to the value)
PANELS = [("loss", "train loss", 1.0), ("eval_loss", "eval loss", 1.0), ("lr", "learning rate", 1.0),
          ("grad_norm", "grad norm", 1.0), ("tokens_per_s", "tokens/s", 1.0), ("mfu", "MFU (%)", 100.0)]


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[int]]:
    """The step records of ``run_dir`` (one per step, the last written wins, sorted by step)
    and the steps that runs resumed from."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a run directory?)")
    by_step: dict[int, dict] = {}
    resumes: list[int] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "step" not in record:
            continue  # an event line without a step
        if "resumed_from" in record:
            resumes.append(int(record["resumed_from"]))
        by_step[int(record["step"])] = record
    return [by_step[k] for k in sorted(by_step)], resumes


def _series(records: list[dict], key: str, scale: float) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(record["step"])
            values.append(value * scale)
    return steps, values


def plot_runs(run_dirs: list[str], out_png: str) -> str:
    """Draw the runs' curves into ``out_png``; returns its path. Panels without data in any run
    say so instead of staying blank."""
    # deferred: matplotlib is optional (only `sbtrain plot` draws)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    runs = [(str(d), *read_metrics(d)) for d in run_dirs]
    fig = Figure(figsize=(14, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).flatten()
    for ax, (key, title, scale) in zip(axes, PANELS):
        drawn = False
        for index, (name, records, resumes) in enumerate(runs):
            steps, values = _series(records, key, scale)
            if not steps:
                continue
            color = f"C{index % 10}"
            style = "o-" if key == "eval_loss" or len(steps) < 30 else "-"
            ax.plot(steps, values, style, color=color, markersize=3, label=Path(name).name or name)
            for step in resumes:
                ax.axvline(step, color=color, linestyle=":", linewidth=1)
            drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        elif len(runs) > 1:
            ax.legend(fontsize=7)
        if key == "lr" and drawn:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    resumed = any(resumes for _, _, resumes in runs)
    fig.suptitle(", ".join(name for name, _, _ in runs)
                 + ("  (dotted: resumed from a checkpoint)" if resumed else ""), fontsize=9)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return str(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sbtrain plot", description="plot metrics.jsonl of one or more runs into one PNG")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", default="",
                        help="PNG to write (default: RUN_DIR/metrics.png of the first run)")
    args = parser.parse_args(argv)
    out = args.out or str(Path(args.run_dirs[0]) / "metrics.png")
    try:
        path = plot_runs(args.run_dirs, out)
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0

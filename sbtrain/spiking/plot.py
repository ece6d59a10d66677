"""The ``sbtrain spikestats`` PNG: the |s| histogram and the per-layer sparsity.

matplotlib is imported here only, on use, and through its object API (``Figure`` with the
Agg canvas) rather than pyplot, so no global backend is selected and no display is needed.
"""

from __future__ import annotations

from pathlib import Path


def write_plot(report: dict, path: str | Path) -> Path:
    """Draw ``report`` (the spikestats JSON) into a PNG at ``path``; returns the path."""
    # deferred: matplotlib is optional (only `spikestats --plot` draws)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    hist_ax, layer_ax = fig.subplots(1, 2, width_ratios=[1, 1.3])
    _draw_histogram(hist_ax, report["overall"]["abs_histogram"])
    _draw_layers(layer_ax, report["layers"], report["overall"]["sparsity"])
    coding = report["coding"]
    fig.suptitle(f"spike counts: k={report['spiking']['k']:g}, weights "
                 f"{report['spiking']['weight_quant']}, {coding['scheme']} coding, "
                 f"T={coding['T']}, {report['data']['tokens']:,} tokens")
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def _draw_histogram(ax, hist: dict) -> None:
    """Fraction of activations per |s| bin (log scale: the tail is orders smaller)."""
    total = sum(hist["counts"]) or 1
    fractions = [c / total for c in hist["counts"]]
    ax.bar(range(len(fractions)), fractions, color="tab:blue")
    ax.set_xticks(range(len(fractions)), hist["bins"], rotation=90, fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("|s| (spike count per activation)")
    ax.set_ylabel("fraction of activations")
    ax.set_title("|s| histogram, all spiked inputs")


def _draw_layers(ax, layers: list[dict], overall: float) -> None:
    """Sparsity per layer, labelled with the layer's mixer and FFN symbols."""
    labels = [f"{e['layer']} {e['mixer']}{e['ffn']}" for e in layers]
    ax.bar(range(len(layers)), [e["sparsity"] for e in layers], color="tab:green")
    ax.axhline(overall, color="black", linestyle="--", linewidth=1, label=f"overall {overall:.3f}")
    ax.set_xticks(range(len(layers)), labels, rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer (index, mixer, FFN)")
    ax.set_ylabel("sparsity in the window")
    ax.set_title("per-layer sparsity")
    ax.legend(loc="lower right", fontsize=8)

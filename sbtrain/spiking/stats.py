"""Spike-count statistics per site, per layer and overall (``sbtrain spikestats``).

Counts are kept as exact histograms (count value -> activations), so every number below is
computed from the same data a full dump of the counts would give, in O(distinct values)
memory: sparsity under any coding and window (``coding.histogram_window_sparsity``), the
distribution of ``|s|`` and the mean count.

Definitions (``n`` = activations, i.e. elements of the spiked inputs):

- ``mean_abs_count``: mean ``|s|``, the training log's ``spike_mean_count``;
- ``firing_rate``: fraction with ``s != 0``, the training log's ``spike_firing_rate``;
- ``sparsity``, ``mean_spikes_per_channel``, ``silent_fraction``, ``overflow_fraction``:
  :func:`sbtrain.spiking.coding.window_sparsity` of the counts under the chosen coding and
  window ``T`` (a "channel" is one activation, as in the report's Sec. 5.5);
- ``abs_histogram``: activations with ``|s| = 0, 1, ..., bins - 1`` and ``>= bins``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from sbtrain.spiking.coding import energy_estimate, histogram_window_sparsity


class CountHistogram:
    """Exact histogram of integer spike counts: value -> number of activations."""

    def __init__(self) -> None:
        self.freq: dict[int, int] = {}

    def add(self, counts: torch.Tensor) -> None:
        values, freqs = torch.unique(counts.detach().reshape(-1).long(), return_counts=True)
        for value, freq in zip(values.tolist(), freqs.tolist()):
            self.freq[value] = self.freq.get(value, 0) + freq

    def update(self, other: CountHistogram) -> CountHistogram:
        for value, freq in other.freq.items():
            self.freq[value] = self.freq.get(value, 0) + freq
        return self

    @classmethod
    def merged(cls, hists: Iterable[CountHistogram]) -> CountHistogram:
        out = cls()
        for hist in hists:
            out.update(hist)
        return out

    @property
    def numel(self) -> int:
        return sum(self.freq.values())

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, freqs) as int64 tensors, values ascending."""
        values = sorted(self.freq)
        return (torch.tensor(values, dtype=torch.int64),
                torch.tensor([self.freq[v] for v in values], dtype=torch.int64))


def abs_histogram(hist: CountHistogram, bins: int) -> dict:
    """Activations per ``|s|`` value ``0 .. bins - 1``, and the rest in one ``>= bins`` bin."""
    counts = [0] * (bins + 1)
    for value, freq in hist.freq.items():
        counts[min(abs(value), bins)] += freq
    return {"bins": [str(b) for b in range(bins)] + [f">={bins}"], "counts": counts}


def count_stats(hist: CountHistogram, scheme: str, T: int, bins: int | None = None) -> dict:
    """The module docstring's statistics of one histogram (``abs_histogram`` if ``bins``)."""
    n = hist.numel
    if not n:
        raise ValueError("no spike counts were recorded")
    abs_total = sum(abs(v) * f for v, f in hist.freq.items())
    stats = {
        "elements": n,
        "mean_abs_count": abs_total / n,
        "firing_rate": sum(f for v, f in hist.freq.items() if v) / n,
        "max_abs_count": max(abs(v) for v in hist.freq),
    }
    window = histogram_window_sparsity(*hist.tensors(), scheme, T)
    stats.update({k: v for k, v in window.items() if k != "T"})
    if bins:
        stats["abs_histogram"] = abs_histogram(hist, bins)
    return stats


_LAYER_SITE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def split_site(site: str) -> tuple[int | None, str]:
    """``decoder.layers.3.mlp.linear_fc1`` -> ``(3, "mlp.linear_fc1")``; others -> ``(None, site)``."""
    match = _LAYER_SITE.match(site)
    return (int(match.group(1)), match.group(2)) if match else (None, site)


def spike_report(sites: dict[str, CountHistogram], layers: list[tuple[str, str]], scheme: str,
                 T: int, bins: int) -> dict:
    """Overall and per-layer statistics of a recorder's per-site histograms.

    Args:
        sites: site name (see ``sbtrain.spiking.layers.neuron_sites``) -> histogram.
        layers: ``(mixer, ffn)`` symbols of each decoder layer, by index.
        scheme, T: the coding and window of the sparsity figures.
        bins: ``|s|`` histogram bins of the overall and per-layer entries.

    Returns:
        ``{"overall": stats + "energy", "layers": [stats + layer, mixer, ffn, "sites"],
        "other_sites": {...}}`` (the last for neuron calls outside the decoder layers).
    """
    per_layer: dict[int, dict[str, CountHistogram]] = {}
    other = {}
    for site, hist in sites.items():
        index, local = split_site(site)
        (per_layer.setdefault(index, {}) if index is not None else other)[local] = hist
    overall = count_stats(CountHistogram.merged(sites.values()), scheme, T, bins)
    overall["energy"] = energy_estimate(overall["mean_spikes_per_channel"])
    entries = []
    for index in sorted(per_layer):
        mixer, ffn = layers[index] if index < len(layers) else ("?", "?")
        entry = {"layer": index, "mixer": mixer, "ffn": ffn}
        entry.update(count_stats(CountHistogram.merged(per_layer[index].values()), scheme, T, bins))
        entry["sites"] = {name: count_stats(h, scheme, T)
                          for name, h in sorted(per_layer[index].items())}
        entries.append(entry)
    report = {"overall": overall, "layers": entries}
    if other:
        report["other_sites"] = {name: count_stats(h, scheme, T) for name, h in sorted(other.items())}
    return report

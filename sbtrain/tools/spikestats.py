"""``sbtrain spikestats``: firing, sparsity and energy of a checkpoint's spiking neurons.

    sbtrain spikestats --config YAML --checkpoint CKPT [--data valid:8] [--batch-size B]
                       [--coding bitwise_bidirectional] [--window 3] [--bins 16]
                       [--w8aspike] [--out DIR] [--device auto|cpu|cuda] [--dtype fp32|bf16]
                       [--set SECTION.KEY=VALUE ...] [--stage NAME]

Builds the config's model in this process (all parallel sizes 1), loads the checkpoint's
weights and runs it over sample tokens with the neuron on: the neuron has no parameters, so a
checkpoint trained without spiking is measured as SpikingBrain measured its converted model.
``--data SPLIT[:N]`` takes N samples (default 8) of the config's ``train`` or ``valid``
split, synthetic or indexed as its ``data`` section says. ``--w8aspike`` (or
``spiking.weight_quant: int8_g128`` in the YAML) first fake-quantises the spiked projections'
weights to INT8 (``sbtrain.spiking.quant``): SpikingBrain's W8ASpike evaluation mode.

Writes ``spikestats.json`` and ``spikestats.png`` into ``--out``: per layer (and per spiked
input inside it) and overall, the sparsity under a ``--window``-step train of ``--coding``,
mean spikes per channel, the fraction of silent channels, the ``|s|`` histogram, the LM loss
on the samples, and the report's energy model (``sbtrain.spiking.stats`` defines each field).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from maca_compat.platform import get_platform
from ops.documents import segment_ids_from_tokens
from sbtrain.config import ConfigError, RunConfig, load_config
from sbtrain.convert.session import load_weights, one_process_model
from sbtrain.data.datasets import build_datasets, default_cache_dir, document_eod
from sbtrain.model.batch import batch_context
from sbtrain.spiking.coding import SCHEMES
from sbtrain.spiking.layers import attribute_sites, recording
from sbtrain.spiking.plot import write_plot
from sbtrain.spiking.quant import apply_weight_quant
from sbtrain.spiking.stats import spike_report


W8ASPIKE = ["spiking.enabled=true", "spiking.weight_quant=int8_g128"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclasses.dataclass
class StatsOptions:
    """What to measure and how (the CLI flags)."""

    split: str = "valid"
    samples: int = 8
    batch_size: int = 0
    """Samples per forward; 0 means train.micro_batch_size."""
    scheme: str = "bitwise_bidirectional"
    window: int = 3
    bins: int = 16
    device: str = "auto"
    dtype: str = "fp32"


def parse_data(spec: str) -> tuple[str, int]:
    """``valid``, ``train:32`` -> (split, samples)."""
    split, _, count = spec.partition(":")
    if split not in ("train", "valid"):
        raise ValueError(f"--data {spec!r}: the split must be train or valid")
    try:
        samples = int(count) if count else StatsOptions.samples
    except ValueError:
        raise ValueError(f"--data {spec!r}: the sample count must be an integer") from None
    if samples < 1:
        raise ValueError(f"--data {spec!r}: need at least one sample")
    return split, samples


def load_stats_config(path: str, overrides: list[str], stage: str | None,
                      w8aspike: bool) -> tuple[RunConfig, bool]:
    """The config with the neuron switched on (and W8ASpike if asked); also whether the
    config itself enables spiking."""
    as_written = load_config(path, overrides, stage=stage)
    forced = W8ASPIKE if w8aspike else ["spiking.enabled=true"]
    return load_config(path, [*overrides, *forced], stage=stage), as_written.spiking.enabled


def sample_batches(cfg: RunConfig, opts: StatsOptions) -> Iterator[dict[str, torch.Tensor]]:
    """``opts.samples`` samples of the config's split, stacked into batches."""
    train, valid = build_datasets(cfg, (opts.samples, opts.samples), default_cache_dir(cfg))
    dataset = train if opts.split == "train" else valid
    if dataset is None:
        raise ConfigError(f"data.split {cfg.data.split!r} leaves the valid split empty; use "
                          "--data train:N", key="data.split")
    size = opts.batch_size or cfg.train.micro_batch_size
    for start in range(0, opts.samples, size):
        items = [dataset[i] for i in range(start, min(start + size, opts.samples))]
        yield {key: torch.stack([torch.as_tensor(item[key]) for item in items])
               for key in ("tokens", "labels", "loss_mask", "position_ids")}


class Progress:
    """A progress line every 1/20 of the batches (every batch when there are at most 20)."""

    def __init__(self, batches: int) -> None:
        self.batches, self.every = batches, max(1, batches // 20)
        self.start = time.perf_counter()

    def update(self, done: int, samples: int) -> None:
        if done % self.every and done != self.batches:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.batches - done)
        print(f"spikestats: batch {done}/{self.batches} ({samples} samples) "
              f"{elapsed:.1f} s, ~{eta:.0f} s left", flush=True)


def measure(model: torch.nn.Module, cfg: RunConfig, opts: StatsOptions,
            device: torch.device) -> tuple[dict, dict]:
    """Run the samples through ``model``; returns (per-site histograms, loss summary)."""
    eod = document_eod(cfg) if cfg.data.document_mask else None
    size = opts.batch_size or cfg.train.micro_batch_size
    progress = Progress(math.ceil(opts.samples / size))
    loss_sum, tokens, done = 0.0, 0.0, 0
    model.eval()
    with torch.no_grad(), recording(by_site=True) as recorder, attribute_sites(model, recorder):
        for i, batch in enumerate(sample_batches(cfg, opts)):
            batch = {k: v.to(device) for k, v in batch.items()}
            segments = None if eod is None else segment_ids_from_tokens(batch["tokens"], eod)
            # the documents derived once per batch, as the trainer does (one process: no SP)
            seq = batch["tokens"].shape[1]
            context = batch_context(seq, segments, None, cfg.model.sink_tokens + seq)
            per_token = model(batch["tokens"], batch["position_ids"], None,
                              labels=batch["labels"], packed_seq_params=context)
            mask = batch["loss_mask"].float()
            loss_sum += float((per_token.float() * mask).sum())
            tokens += float(mask.sum())
            done += batch["tokens"].shape[0]
            progress.update(i + 1, done)
    mean = loss_sum / max(tokens, 1.0)
    return recorder.sites, {"loss": mean, "perplexity": math.exp(min(mean, 700.0))}


def _device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)

    return get_platform().device(0)


def run_spikestats(cfg: RunConfig, checkpoint: str, opts: StatsOptions,
                   meta: dict | None = None) -> dict:
    """Measure ``checkpoint`` under ``cfg`` (spiking enabled); returns the report dict."""
    if not cfg.spiking.enabled:
        raise ConfigError("spikestats measures the neuron: enable it", key="spiking.enabled")
    device = _device(opts.device)
    with one_process_model(cfg, DTYPES[opts.dtype], str(device)) as model:
        step = load_weights(model, checkpoint)
        # The builder leaves plain torch.nn submodules (GLA's gate_down) in fp32; training
        # casts the whole model (Float16Module), so this casts it too.
        model.to(DTYPES[opts.dtype])
        quantised = apply_weight_quant(model, cfg.spiking.weight_quant)
        print(f"spikestats: step {step} of {checkpoint} on {device}; weights "
              f"{cfg.spiking.weight_quant} ({len(quantised)} tensors quantised)", flush=True)
        sites, loss = measure(model, cfg, opts, device)
    report = {
        **(meta or {}),
        "checkpoint": str(checkpoint), "step": step, "device": str(device), "dtype": opts.dtype,
        "data": {"kind": cfg.data.kind, "split": opts.split, "samples": opts.samples,
                 "seq_length": cfg.train.seq_length,
                 "tokens": opts.samples * cfg.train.seq_length},
        "spiking": {"k": cfg.spiking.k, "vth_min": cfg.spiking.vth_min,
                    "vth_max": cfg.spiking.vth_max, "weight_quant": cfg.spiking.weight_quant,
                    "quantised_tensors": len(quantised)},
        "coding": {"scheme": opts.scheme, "T": opts.window},
        **loss,
    }
    report.update(spike_report(sites, cfg.model.layers, opts.scheme, opts.window, opts.bins))
    return report


def write_outputs(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """``spikestats.json`` and ``spikestats.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "spikestats.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    return json_path, write_plot(report, out / "spikestats.png")


def format_summary(report: dict) -> str:
    """A few lines for the terminal: overall figures, then one line per layer."""
    o, c = report["overall"], report["coding"]
    lines = [f"overall: sparsity {o['sparsity']:.4f} ({c['scheme']}, T={c['T']}), "
             f"{o['mean_spikes_per_channel']:.3f} spikes/channel, silent "
             f"{o['silent_fraction']:.4f}, mean |s| {o['mean_abs_count']:.3f}, "
             f"loss {report['loss']:.4f}",
             f"energy: {o['energy']['spike_pj']:.4f} pJ per MAC-equivalent, "
             f"{o['energy']['ratio_vs_fp16']:.1f}x below FP16, "
             f"{o['energy']['ratio_vs_int8']:.2f}x below INT8"]
    for e in report["layers"]:
        lines.append(f"  layer {e['layer']:>3} {e['mixer']}{e['ffn']}: sparsity "
                     f"{e['sparsity']:.4f}, {e['mean_spikes_per_channel']:.3f} spikes/channel, "
                     f"silent {e['silent_fraction']:.4f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sbtrain spikestats", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="sbtrain YAML describing the model and data")
    p.add_argument("--checkpoint", required=True, help="sbtrain checkpoint directory")
    p.add_argument("--data", default="valid", metavar="SPLIT[:N]",
                   help="N samples (default 8) of the config's train or valid split")
    p.add_argument("--batch-size", type=int, default=0,
                   help="samples per forward (default train.micro_batch_size)")
    p.add_argument("--coding", choices=SCHEMES, default="bitwise_bidirectional",
                   help="spike coding of the counts (the report uses bitwise_bidirectional)")
    p.add_argument("--window", type=int, default=3, help="time steps T of the sparsity window")
    p.add_argument("--bins", type=int, default=16, help="|s| histogram bins before the >= bin")
    p.add_argument("--w8aspike", action="store_true",
                   help="INT8 group-128 weights of the spiked projections (W8ASpike)")
    p.add_argument("--out", default="runs/spikestats", help="directory for the JSON and PNG")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model dtype")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")
    p.add_argument("--stage", default=None, help="use this stage of the config's stages list")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        split, samples = parse_data(args.data)
        if args.window < 1 or args.bins < 1 or args.batch_size < 0:
            raise ValueError("--window and --bins must be >= 1, --batch-size >= 0")
        opts = StatsOptions(split, samples, args.batch_size, args.coding, args.window,
                            args.bins, args.device, args.dtype)
        cfg, enabled = load_stats_config(args.config, args.overrides, args.stage, args.w8aspike)
        meta = {"config": args.config, "spiking_enabled_in_config": enabled}
        report = run_spikestats(cfg, args.checkpoint, opts, meta)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"spikestats error: {exc}", file=sys.stderr)
        return 2
    json_path, png_path = write_outputs(report, args.out)
    print(format_summary(report))
    print(f"wrote {json_path} and {png_path}", flush=True)
    return 0

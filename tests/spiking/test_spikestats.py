"""``sbtrain spikestats``: histogram statistics, per-site recording, and the command end to end."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch

from parallel.init import init_parameters_globally
from sbtrain.config import load_config
from sbtrain.convert.session import load_weights, one_process_model, save_weights
from sbtrain.spiking import SCHEMES, histogram_window_sparsity, window_sparsity
from sbtrain.spiking.stats import CountHistogram, abs_histogram, count_stats, split_site

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "examples/configs/spikingbrain_7b_tiny.yaml")
STAGE = "short"
SAMPLES = 5                     # with micro-batch 2: batches of 2, 2 and 1
# Spiked activations per token, hidden 64 / FFN 128: an L layer spikes linear_qkv, the gate,
# linear_proj and fc1 inputs (64 each) and fc2's (128); a W layer the same with its queries
# (4 heads x 16) in place of the gate. Four layers of 384.
SPIKED_PER_TOKEN = 4 * (4 * 64 + 128)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_histogram_form_equals_window_sparsity(scheme: str):
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-20, 21, (40, 30), generator=g)
    x[0, 0] = 300                                    # one burst: overflows the window
    if scheme in ("binary", "bitwise"):
        x = x.abs()
    hist = CountHistogram()
    for part in x.split(7):                          # accumulated over several calls
        hist.add(part.to(torch.int32))
    values, freqs = hist.tensors()
    assert hist.numel == x.numel() and int(freqs.sum()) == x.numel()
    assert histogram_window_sparsity(values, freqs, scheme, 3) == window_sparsity(x, scheme, 3)
    # a value with frequency 0 counts for nothing, not even the two's complement width
    padded = histogram_window_sparsity(torch.cat([values, torch.tensor([-(2 ** 40)])]),
                                       torch.cat([freqs, torch.tensor([0])]), scheme, 3)
    assert padded == window_sparsity(x, scheme, 3)


def test_count_stats_hand_example():
    hist = CountHistogram()
    hist.add(torch.tensor([0, 1, -1, 5, -8, 7, 3, -3, 20]))
    stats = count_stats(hist, "bitwise_bidirectional", 3, bins=4)
    # |s| = 0,1,1,5,8,7,3,3,20 -> 48 / 9; popcounts 0,1,1,2,1,3,2,2,2 -> 14 spikes
    assert stats["elements"] == 9 and stats["max_abs_count"] == 20
    assert stats["mean_abs_count"] == pytest.approx(48 / 9)
    assert stats["firing_rate"] == pytest.approx(8 / 9)
    assert stats["mean_spikes_per_channel"] == pytest.approx(14 / 9)
    assert stats["sparsity"] == pytest.approx(1 - 14 / 27)
    assert stats["silent_fraction"] == pytest.approx(1 / 9)
    assert stats["overflow_fraction"] == pytest.approx(2 / 9)       # 8 and 20 need > 3 bits
    assert abs_histogram(hist, 4) == {"bins": ["0", "1", "2", "3", ">=4"], "counts": [1, 2, 0, 2, 4]}
    assert split_site("decoder.layers.12.mlp.linear_fc1") == (12, "mlp.linear_fc1")
    assert split_site("output_layer") == (None, "output_layer")


def _lm_loss(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss; the config's document mask ends synthetic documents at token 0."""
    from ops.documents import segment_ids_from_tokens

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model(tokens, positions, segment_ids_from_tokens(tokens, 0), labels=labels).flatten()


def test_site_recording_keeps_the_training_sums():
    """The per-site mode adds histograms; the sums the trainer logs stay the same."""
    from sbtrain.spiking.layers import attribute_sites, recording

    cfg = load_config(CONFIG, ["spiking.enabled=true"], stage=STAGE)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with one_process_model(cfg) as model, torch.no_grad():
        init_parameters_globally(model, 1, 0.02, cfg.model.num_layers)
        with recording() as plain:
            _lm_loss(model, tokens, tokens)
        with recording(by_site=True) as sited, attribute_sites(model, sited):
            _lm_loss(model, tokens, tokens)
        assert not model.decoder.layers[0].mlp.linear_fc1._forward_pre_hooks   # hooks removed
    assert plain.sites is None
    assert (sited.abs_counts, sited.firing, sited.elements) == \
        (plain.abs_counts, plain.firing, plain.elements)
    assert sum(h.numel for h in sited.sites.values()) == plain.elements
    per_layer = {"mlp.linear_fc1", "mlp.linear_fc2", "self_attention.linear_qkv",
                 "self_attention.linear_proj"}
    expected = {f"decoder.layers.{i}.{s}" for i in range(4) for s in per_layer}
    expected |= {f"decoder.layers.{i}.self_attention.gate_down" for i in (0, 2)}
    expected |= {f"decoder.layers.{i}.self_attention.core_attention.query" for i in (1, 3)}
    assert set(sited.sites) == expected


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Random weights of the tiny 7B layout (std 0.2, so the layers differ visibly)."""
    path = tmp_path_factory.mktemp("spikestats") / "ckpt"
    cfg = load_config(CONFIG, stage=STAGE)
    with one_process_model(cfg) as model:
        init_parameters_globally(model, 3, 0.2, cfg.model.num_layers)
        save_weights(model, path)
    return path


_QUANTISED = re.compile(r"decoder\.layers\.\d+\.(self_attention\.(linear_qkv|linear_proj|gate_down)"
                        r"|mlp\.linear_fc[12])\.weight$")


def independent_counts(ckpt: Path, w8aspike: bool, k: float = 3.0) -> tuple[dict, float]:
    """Per-layer spike counts from the inputs of the spiked modules, via the ops.spike
    reference and forward pre-hooks (no recorder), and the mean LM loss."""
    from ops.spike.naive import naive_spike_counts
    from sbtrain.data.datasets import VALID_SEED_OFFSET, SyntheticDataset
    from sbtrain.spiking.quant import fake_quant_int8_groupwise

    cfg = load_config(CONFIG, ["spiking.enabled=true"], stage=STAGE)
    data = SyntheticDataset(SAMPLES, cfg.train.seq_length, cfg.model.vocab_size,
                            seed=cfg.train.seed + VALID_SEED_OFFSET)
    counts: dict[int, list[torch.Tensor]] = {}

    def keep(layer: int, x: torch.Tensor) -> None:
        counts.setdefault(layer, []).append(naive_spike_counts(x, k, 1e-5, 1e4)[0].flatten())

    with one_process_model(cfg) as model, torch.no_grad():
        load_weights(model, ckpt)
        for name, param in model.named_parameters():
            if w8aspike and _QUANTISED.search(name):
                param.copy_(fake_quant_int8_groupwise(param, 128))
        for i, layer in enumerate(model.decoder.layers):
            attn = layer.self_attention
            spiked = [attn.linear_qkv, attn.linear_proj, layer.mlp.linear_fc1, layer.mlp.linear_fc2]
            spiked += [attn] if hasattr(attn, "gate_down") else [attn.core_attention]
            for module in spiked:
                module.register_forward_pre_hook(lambda _m, args, i=i: keep(i, args[0]))
        model.eval()
        losses = []
        for start in range(0, SAMPLES, 2):
            tokens = torch.stack([data[j]["tokens"] for j in range(start, min(start + 2, SAMPLES))])
            labels = torch.stack([data[j]["labels"] for j in range(start, min(start + 2, SAMPLES))])
            losses.append(_lm_loss(model, tokens, labels))
    return {i: torch.cat(c) for i, c in counts.items()}, float(torch.cat(losses).mean())


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("w8aspike,coding,window", [(False, "bitwise_bidirectional", 3),
                                                     (True, "ternary", 4)])
def test_spikestats_end_to_end(checkpoint, tmp_path, w8aspike, coding, window):
    from sbtrain.cli import main

    out = tmp_path / "out"
    argv = ["spikestats", "--config", CONFIG, "--stage", STAGE, "--checkpoint", str(checkpoint),
            "--data", f"valid:{SAMPLES}", "--coding", coding, "--window", str(window),
            "--bins", "8", "--out", str(out)] + (["--w8aspike"] if w8aspike else [])
    assert main(argv) == 0
    report = json.loads((out / "spikestats.json").read_text())
    counts, loss = independent_counts(checkpoint, w8aspike)

    assert report["spiking"]["weight_quant"] == ("int8_g128" if w8aspike else "none")
    assert report["spiking"]["quantised_tensors"] == (18 if w8aspike else 0)   # 4x4 + 2 GLA gates
    assert report["spiking_enabled_in_config"] is False and report["step"] == 0
    assert report["data"]["tokens"] == SAMPLES * 64
    assert report["overall"]["elements"] == SAMPLES * 64 * SPIKED_PER_TOKEN
    assert report["loss"] == pytest.approx(loss, rel=1e-5)
    every = torch.cat(list(counts.values()))
    _check_stats(report["overall"], every, coding, window)
    assert report["overall"]["energy"]["spike_pj"] == pytest.approx(
        0.03 * report["overall"]["mean_spikes_per_channel"])
    assert [e["layer"] for e in report["layers"]] == [0, 1, 2, 3]
    assert [e["mixer"] + e["ffn"] for e in report["layers"]] == ["L-", "W-", "L-", "W-"]
    for entry in report["layers"]:
        _check_stats(entry, counts[entry["layer"]], coding, window)
    assert _png_size(out / "spikestats.png") == (1210, 462)


def _check_stats(stats: dict, counts: torch.Tensor, coding: str, window: int) -> None:
    expected = window_sparsity(counts, coding, window)
    assert stats["elements"] == counts.numel()
    for key in ("sparsity", "mean_spikes_per_channel", "silent_fraction", "overflow_fraction"):
        assert stats[key] == pytest.approx(expected[key], rel=1e-12), key
    assert stats["mean_abs_count"] == pytest.approx(counts.abs().double().mean().item(), rel=1e-12)
    bins = torch.bincount(counts.abs().clamp(max=8), minlength=9).tolist()
    assert stats["abs_histogram"]["counts"] == bins


def test_spikestats_on_indexed_data(checkpoint, tmp_path):
    """``--data train:N`` reads the config's indexed dataset (here the shipped sample corpus)."""
    from sbtrain.cli import main
    from sbtrain.data.datasets import build_datasets
    from sbtrain.data.preprocess import preprocess

    prefix = str(tmp_path / "corpus")
    preprocess(str(REPO / "examples/data/sample_corpus.jsonl"), prefix,
               str(REPO / "examples/data/tokenizer.json"), log_every=0)
    sets = ["data.kind=indexed", f"data.paths=[{prefix}]", f"data.cache_dir={tmp_path / 'cache'}",
            f"data.tokenizer={REPO / 'examples/data/tokenizer.json'}"]
    argv = ["spikestats", "--config", CONFIG, "--stage", STAGE, "--checkpoint", str(checkpoint),
            "--data", "train:3", "--batch-size", "3", "--out", str(tmp_path / "out")]
    assert main(argv + [x for item in sets for x in ("--set", item)]) == 0
    report = json.loads((tmp_path / "out" / "spikestats.json").read_text())
    assert report["data"] == {"kind": "indexed", "split": "train", "samples": 3,
                              "seq_length": 64, "tokens": 192}
    assert report["overall"]["elements"] == 192 * SPIKED_PER_TOKEN

    cfg = load_config(CONFIG, ["spiking.enabled=true", *sets], stage=STAGE)
    train, _ = build_datasets(cfg, (3, 3), str(tmp_path / "cache"))
    eod = 0                                          # the shipped tokenizer's EOD id
    tokens = torch.stack([torch.as_tensor(train[i]["tokens"]) for i in range(3)])
    labels = torch.stack([torch.as_tensor(train[i]["labels"]) for i in range(3)])
    assert int((tokens == eod).sum()) > 0            # real documents: the mask matters
    with one_process_model(cfg) as model, torch.no_grad():
        load_weights(model, checkpoint)
        model.eval()
        loss = float(_lm_loss(model, tokens, labels).mean())
    assert report["loss"] == pytest.approx(loss, rel=1e-5)

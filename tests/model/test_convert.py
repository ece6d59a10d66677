"""``sbtrain convert``: tiny random HF Qwen2 models built locally (no hub downloads)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
import yaml

from sbtrain.config import load_config
from sbtrain.convert import hf_to_sbtrain, main, sbtrain_to_hf
from sbtrain.convert.hf_io import read_hf_dir
from sbtrain.convert.session import load_weights, model_tensors, one_process_model

SEQ = 20
QWEN = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, rope_theta=1e6,
            rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A random Qwen2ForCausalLM saved as safetensors, with non-trivial biases and norms."""
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN, attn_implementation="eager"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                param.add_(0.3 * torch.randn_like(param))
    path = tmp_path_factory.mktemp("qwen2")
    model.save_pretrained(path, safe_serialization=True)
    return path


def write_yaml(path, pattern: str, window: int = 4096) -> str:
    model = dict(pattern=pattern, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=48, vocab_size=64, max_position_embeddings=64,
                 sliding_window=window, norm_eps=1e-6)
    path.write_text(yaml.safe_dump({"model": model}))
    return str(path)


def hf_logits(hf_dir, tokens):
    model = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
    with torch.no_grad():
        return model(tokens).logits


def sbtrain_logits(config: str, ckpt, tokens):
    with one_process_model(load_config(config)) as model:
        load_weights(model, ckpt)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        with torch.no_grad():
            return model(tokens, positions, None)


@pytest.mark.parametrize("pattern,window", [("*-*-*-*-", 4096), ("W-W-W-W-", SEQ)])
def test_converted_softmax_model_reproduces_qwen2_logits(qwen_dir, tmp_path, pattern, window):
    config = write_yaml(tmp_path / "m.yaml", pattern, window)
    ckpt = hf_to_sbtrain(str(qwen_dir), config, str(tmp_path / "ckpt"))
    tokens = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(1))
    ref, ours = hf_logits(qwen_dir, tokens), sbtrain_logits(config, ckpt.parent, tokens)
    assert (ours - ref).abs().max().item() < 1e-4, (ours - ref).abs().max().item()


def test_convert_export_reimport_is_lossless(qwen_dir, tmp_path):
    config = write_yaml(tmp_path / "hybrid.yaml", "L-W-L-W-")
    first = hf_to_sbtrain(str(qwen_dir), config, str(tmp_path / "a")).parent
    exported = sbtrain_to_hf(config, str(first), str(tmp_path / "hf"), dtype="fp32")
    hf_config, tensors = read_hf_dir(exported)
    assert hf_config["architectures"] == ["GLAswaForCausalLM"]
    assert hf_config["model_type"] == "gla_swa" and hf_config["attn_layers"] == [1, 3]
    assert "model.layers.0.attn.gk_proj.1.bias" in tensors and "model.layers.0.attn.g_norm.weight" in tensors
    assert "model.layers.1.attn.gk_proj.0.weight" not in tensors
    second = hf_to_sbtrain(str(exported), config, str(tmp_path / "b")).parent
    cfg = load_config(config)
    with one_process_model(cfg) as model:
        load_weights(model, first)
        a = {k: v.clone() for k, v in model_tensors(model).items()}
        load_weights(model, second)
        b = model_tensors(model)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The reused Qwen2 projections arrive unchanged in the official layout.
    _, qwen = read_hf_dir(qwen_dir)
    for name in ("q_proj.weight", "k_proj.bias", "o_proj.weight"):
        assert torch.equal(tensors[f"model.layers.0.attn.{name}"],
                           qwen[f"model.layers.0.self_attn.{name}"])


def test_new_gla_parameters_follow_the_documented_init(qwen_dir, tmp_path):
    config = write_yaml(tmp_path / "hybrid.yaml", "L-W-L-W-")
    ckpt = hf_to_sbtrain(str(qwen_dir), config, str(tmp_path / "c")).parent
    with one_process_model(load_config(config)) as model:
        load_weights(model, ckpt)
        state = model_tensors(model)
    prefix = "decoder.layers.0.self_attention."
    assert torch.equal(state[prefix + "g_norm_weight"], torch.ones(8))
    assert torch.equal(state[prefix + "gate_up.bias"], torch.zeros(16))
    bound = 2 ** -2.5 * (6 / (32 + 16)) ** 0.5          # xavier_uniform, fan 32 -> 16
    down = state[prefix + "gate_down.weight"]
    assert down.abs().max() <= bound and down.std() > bound / 4


def test_mismatched_config_names_the_key(qwen_dir, tmp_path, capsys):
    config = tmp_path / "wrong.yaml"
    config.write_text(yaml.safe_dump({"model": {"pattern": "L-W-L-W-", "hidden_size": 64,
                                                "num_attention_heads": 4, "num_query_groups": 2,
                                                "ffn_hidden_size": 48, "vocab_size": 64}}))
    code = main(["hf-to-sbtrain", "--hf", str(qwen_dir), "--config", str(config),
                 "--out", str(tmp_path / "x")])
    assert code == 2
    assert "model.hidden_size=64 but HF hidden_size=32" in capsys.readouterr().err


def test_missing_tensor_names_the_directory_and_the_tensor(qwen_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(qwen_dir, broken)
    for shard in broken.glob("*.safetensors"):
        tensors = load_file(str(shard))
        tensors.pop("model.norm.weight", None)
        save_file(tensors, str(shard))
    index = broken / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"].pop("model.norm.weight", None)
        index.write_text(json.dumps(data))
    code = main(["hf-to-sbtrain", "--hf", str(broken), "--config",
                 write_yaml(tmp_path / "ok.yaml", "L-W-L-W-"), "--out", str(tmp_path / "x")])
    assert code == 2
    assert f"{broken}: no tensor 'model.norm.weight'" in capsys.readouterr().err


def test_layouts_the_official_class_cannot_hold_export_as_spikingbrain_hybrid(qwen_dir, tmp_path):
    config = write_yaml(tmp_path / "soft.yaml", "*-*-*-*-")
    ckpt = hf_to_sbtrain(str(qwen_dir), config, str(tmp_path / "d")).parent
    hf_config, _ = read_hf_dir(sbtrain_to_hf(config, str(ckpt), str(tmp_path / "hf")))
    assert hf_config["model_type"] == "spikingbrain_hybrid"
    assert hf_config["mixer_types"] == ["full_attention"] * 4


def test_converted_checkpoint_loads_under_tp2_and_pp2(tmp_path):
    """One conversion serves every layout: TP2 and PP2 runs started from it reproduce the
    one-process run, which differs from a fresh initialisation (so the weights were used)."""
    from tests.parallel.harness import TINY, assert_same_curve, run_many

    qwen = dict(QWEN, hidden_size=TINY["model"]["hidden_size"],
                intermediate_size=TINY["model"]["ffn_hidden_size"],
                vocab_size=TINY["model"]["vocab_size"])
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**qwen))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = {**TINY["model"], "pattern": "L-W-L-W-", "sliding_window": 4, "norm_eps": 1e-6}
    config = tmp_path / "m.yaml"
    config.write_text(yaml.safe_dump({"model": model}))
    ckpt = hf_to_sbtrain(str(tmp_path / "hf"), str(config), str(tmp_path / "ckpt")).parent
    overrides = {"model.pattern": "L-W-L-W-", "model.sliding_window": 4,
                 "checkpoint.pretrained": str(ckpt)}
    one = run_many(tmp_path, 1, {"one": overrides, "fresh": {
        k: v for k, v in overrides.items() if k != "checkpoint.pretrained"}})
    two = run_many(tmp_path, 2, {"tp2": {**overrides, "parallel.tp": 2},
                                 "pp2": {**overrides, "parallel.pp": 2}})
    single = one["one"]
    assert_same_curve(single, two["tp2"])
    assert_same_curve(single, two["pp2"])
    assert abs(one["fresh"][0]["loss"] - single[0]["loss"]) > 1e-3

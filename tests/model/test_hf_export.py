"""``sbtrain convert sbtrain-to-hf`` + ``sbtrain.hf``: exported directories load with the Auto
classes, reproduce sbtrain's forward, generate with a recurrent cache and convert back losslessly.

Tiny random models (fp32, CPU), window < sequence, documents off. Three layouts: the official
7B one (L/W), the 76B one (H/F + sinks + MoE with shared expert, shared projections) and a
mixed one (every mixer, separate projections, top-2 MoE without shared expert, tied embeddings).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import transformers
import yaml

from sbtrain.config import load_config
from sbtrain.convert import hf_to_sbtrain, main, sbtrain_to_hf
from sbtrain.convert.export import export_hf
from sbtrain.convert.hf_io import read_hf_dir
from sbtrain.convert.session import load_weights, model_tensors, one_process_model, save_weights
from tests.model.official_reference import official_logits

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
TOKENIZER = os.path.join(REPO, "examples", "data", "tokenizer.json")
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "official_7b_format.json")
SEQ, WINDOW = 24, 5
BASE = dict(hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
            vocab_size=512, max_position_embeddings=128, norm_eps=1e-6, sliding_window=WINDOW)
LAYOUTS = {
    "7b": dict(pattern="L-W-L-W-"),
    "76b": dict(pattern="H-HEF-HE", sink_tokens=3, moe=dict(num_experts=4, top_k=1)),
    "mixed": dict(pattern="L-*EW-F-", sink_tokens=2, qkv_bias=False, untie_embeddings=False,
                  gla=dict(feature_map="sigmoid"), hybrid=dict(shared_projections=False),
                  moe=dict(num_experts=4, top_k=2, shared_expert=False, expert_ffn_hidden_size=24)),
}


def make_run(path, layout: str):
    """(YAML path, checkpoint dir) of a random model whose norms and biases are not trivial."""
    path.mkdir(parents=True, exist_ok=True)
    config = path / "model.yaml"
    config.write_text(yaml.safe_dump({"model": {**BASE, **LAYOUTS[layout]},
                                      "data": {"tokenizer": TOKENIZER}}))
    with one_process_model(load_config(str(config))) as model:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name or name.endswith("bias") or name == "sink_tokens":
                    param.add_(0.3 * torch.randn_like(param))
        save_weights(model, path / "ckpt")
    return str(config), path / "ckpt"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """layout -> (YAML, checkpoint, fp32 export dir)."""
    out = {}
    for layout in LAYOUTS:
        root = tmp_path_factory.mktemp(layout)
        config, ckpt = make_run(root, layout)
        out[layout] = (config, ckpt, sbtrain_to_hf(config, str(ckpt), str(root / "hf"), "fp32"))
    return out


def sbtrain_logits(config: str, ckpt, tokens):
    with one_process_model(load_config(config)) as model:
        load_weights(model, ckpt)
        with torch.no_grad():
            return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)


def auto_model(hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, trust_remote_code=True, dtype=torch.float32).eval()


def tokens(batch=2, seq=SEQ, seed=1):
    return torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_exported_dir_reproduces_sbtrain_logits(runs, layout):
    config, ckpt, hf_dir = runs[layout]
    x = tokens()
    ref = sbtrain_logits(config, ckpt, x)
    with torch.no_grad():
        ours = auto_model(hf_dir)(x).logits
    assert ours.shape == ref.shape
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, err
    assert {"configuration_spikingbrain.py", "modeling_spikingbrain.py",
            "generation_config.json", "tokenizer.json"} <= set(os.listdir(hf_dir))


def test_exported_tokenizer_and_ids(runs):
    _, _, hf_dir = runs["76b"]
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    eod = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_id == tok.pad_token_id == eod
    assert config["eos_token_id"] == config["bos_token_id"] == config["pad_token_id"] == eod
    assert generation["eos_token_id"] == eod
    assert tok.decode(tok("hello world")["input_ids"]) == "hello world"


def test_7b_export_is_the_official_format(runs):
    """Config keys and weight names from the published format; numbers from an independent
    reference of the official forward (tests/model/official_reference.py)."""
    fixture = json.loads(open(FIXTURE).read())
    _, _, hf_dir = runs["7b"]
    config, weights = read_hf_dir(hf_dir)
    assert set(fixture["config_keys"]) <= set(config)
    assert {k: config[k] for k in fixture["config_values"]} == fixture["config_values"]
    assert config["attn_layers"] == [1, 3]
    expected = set(fixture["global_weights"])
    for i in range(4):
        names = fixture["swa_layer_weights" if i % 2 else "gla_layer_weights"]
        expected |= {f"model.layers.{i}.{n}" for n in names}
    assert set(weights) == expected
    x = tokens(1)[0]
    ref = official_logits(x, {k: v.double() for k, v in weights.items()}, config)
    with torch.no_grad():
        ours = auto_model(hf_dir)(x[None]).logits[0].double()
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_official_7b_config_gives_the_official_names_and_shapes():
    from sbtrain.hf.configuration_spikingbrain import GLAswaConfig
    from sbtrain.hf.modeling_spikingbrain import GLAswaForCausalLM

    fixture = json.loads(open(FIXTURE).read())
    config = GLAswaConfig(attn_layers=[0, 2], bos_token_id=151643, eos_token_id=151643)
    with torch.device("meta"):
        model = GLAswaForCausalLM(config)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = set(fixture["global_weights"])
    for i in range(28):
        names = fixture["swa_layer_weights" if i % 2 else "gla_layer_weights"]
        expected |= {f"model.layers.{i}.{n}" for n in names}
    assert set(shapes) == expected
    for name, shape in fixture["shapes_7b"].items():
        assert shapes[f"model.layers.0.{name}"] == shape, name
    assert config.attn_layers == list(range(1, 28, 2))   # as the official class: forced odd


@pytest.mark.parametrize("layout", ["7b", "76b"])
def test_greedy_decoding_with_cache_equals_forward_argmax(runs, layout):
    """generate() (one token at a time from the recurrent cache) picks at every step the
    argmax of a full-sequence forward without cache, far past the window."""
    model = auto_model(runs[layout][2])
    prompt = tokens(2, 4, seed=3)
    out = model.generate(prompt, max_new_tokens=SEQ - 4, do_sample=False, min_new_tokens=SEQ - 4)
    assert out.shape == (2, SEQ)
    with torch.no_grad():
        full = model(out, use_cache=False).logits
    assert torch.equal(full[:, 3:-1].argmax(-1), out[:, 4:])


@pytest.mark.parametrize("layout", ["76b", "mixed"])
def test_cache_holds_state_not_history(runs, layout):
    """Token-by-token logits equal the forward's; GLA / window / linear-branch memory stays
    constant as the context grows, only full-attention layers keep every key."""
    from sbtrain.hf.modeling_spikingbrain import SpikingBrainCache

    model = auto_model(runs[layout][2])
    x = tokens(1, 40, seed=5)
    cache = SpikingBrainCache(model.config.num_hidden_layers)
    with torch.no_grad():
        full = model(x).logits
        steps = [model(x[:, :2], cache=cache).logits]
        sizes = []
        for t in range(2, 40):
            steps.append(model(x[:, t:t + 1], cache=cache).logits)
            if t in (WINDOW + 3, 39):
                sizes.append([cache.memory_bytes(i) for i in range(len(cache.layers))])
    assert ((torch.cat(steps, 1) - full).abs().max() / full.abs().max()).item() < 1e-5
    for kind, early, late in zip(model.config.mixer_types, *sizes):
        if kind in ("full_attention", "hybrid_full"):
            assert late > early, kind
        else:
            assert late == early, kind


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hf_to_sbtrain_of_an_export_is_lossless(runs, tmp_path, layout):
    config, ckpt, hf_dir = runs[layout]
    back = hf_to_sbtrain(str(hf_dir), config, str(tmp_path / "back")).parent
    with one_process_model(load_config(config)) as model:
        load_weights(model, ckpt)
        original = {k: v.clone() for k, v in model_tensors(model).items()}
        load_weights(model, back)
        again = model_tensors(model)
    assert original.keys() == again.keys()
    for key in original:
        assert torch.equal(original[key], again[key]), key


def test_default_bf16_export_is_sharded_and_loads(runs, tmp_path):
    config, ckpt, fp32_dir = runs["76b"]
    out = tmp_path / "bf16"
    export_hf(load_config(config), str(ckpt), out, torch.bfloat16, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _, bf16 = read_hf_dir(out)
    _, fp32 = read_hf_dir(fp32_dir)
    assert bf16.keys() == fp32.keys()
    for key in fp32:
        assert bf16[key].dtype == torch.bfloat16 and torch.equal(bf16[key], fp32[key].bfloat16()), key
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_bad_inputs_are_one_line_errors_naming_file_and_key(runs, tmp_path, capsys):
    config, ckpt, hf_dir = runs["76b"]
    broken = tmp_path / "broken"
    export_hf(load_config(config), str(ckpt), broken, torch.float32, max_shard_bytes=40_000)

    def convert_error(directory) -> str:
        assert main(["hf-to-sbtrain", "--hf", str(directory), "--config", config,
                     "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        # the error is one line (sbtrain's own INFO lines may precede it, never a traceback)
        lines = [line for line in err.strip().splitlines() if line.startswith("convert error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    meta = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**meta, "model_type": "mamba"}))
    assert "config.json" in (msg := convert_error(broken)) and "'mamba'" in msg
    (broken / "config.json").write_text(json.dumps({**meta, "mixer_types": ["retention"] * 4}))
    with pytest.raises(ValueError, match="mixer_types"):
        transformers.AutoModelForCausalLM.from_pretrained(broken, trust_remote_code=True)
    assert "mixer_types" in convert_error(broken)
    (broken / "config.json").write_text(json.dumps(meta))
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert shard.name in convert_error(broken)

    from safetensors.torch import load_file, save_file

    shutil.rmtree(broken)
    shutil.copytree(hf_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["model.layers.0.attn.linear_norm.weight"] = torch.ones(3)
    save_file(weights, str(broken / "model.safetensors"))
    msg = convert_error(broken)
    assert "model.layers.0.attn.linear_norm.weight" in msg and str(broken) in msg


def test_spiking_models_are_refused_with_the_key(runs, tmp_path):
    config, ckpt, _ = runs["7b"]
    with pytest.raises(ValueError, match="spiking.enabled"):
        sbtrain_to_hf(config, str(ckpt), str(tmp_path / "s"), overrides=["spiking.enabled=true"])


def test_sbtrain_generate_prints_the_greedy_continuation(runs, capsys):
    """``sbtrain generate`` on the checkpoint and on its export print the same continuation,
    the greedy one of the exported model."""
    from sbtrain.cli import main as cli_main

    config, ckpt, hf_dir = runs["76b"]
    prompt = "The river"
    assert cli_main(["generate", "--checkpoint", str(ckpt), "--config", config, "--prompt", prompt,
                     "--max-new-tokens", "12"]) == 0
    from_ckpt = capsys.readouterr().out.strip().splitlines()[-1]
    assert cli_main(["generate", "--hf", str(hf_dir), "--prompt", prompt,
                     "--max-new-tokens", "12"]) == 0
    from_hf = capsys.readouterr().out.strip().splitlines()[-1]
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = auto_model(hf_dir).generate(ids, max_new_tokens=12, do_sample=False,
                                      eos_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    expected = prompt + tok.decode(new)
    assert from_ckpt.endswith("] " + expected) and from_hf.endswith("] " + expected)
    assert len(tok.decode(new)) > 0

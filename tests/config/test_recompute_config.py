"""``train.recompute``: every spelling, the deprecated booleans, bad values, and the mapping to
Megatron's TransformerConfig."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from sbtrain.config import load_config, schema
from sbtrain.config.schema import RECOMPUTE_POLICIES, RunConfig, TrainConfig
from sbtrain.model.megatron_config import recompute_fields, to_megatron_config
from tests.config.test_config import assert_names, load_error, write

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"


@pytest.mark.parametrize("policy", ["none", "selective", "full", "auto"])
def test_policy_names_load_from_yaml_and_overrides(tmp_path, policy):
    path = write(tmp_path, {"train": {"recompute": policy}})
    assert load_config(path).train.recompute == policy
    assert load_config(write(tmp_path, {}, "empty.yaml"),
                       [f"train.recompute={policy}"]).train.recompute == policy


def test_default_is_none():
    assert TrainConfig().recompute == "none" == RunConfig().train.recompute
    assert list(RECOMPUTE_POLICIES) == ["none", "selective", "full", "auto"]


@pytest.mark.parametrize(("value", "policy"), [(True, "full"), (False, "none")])
def test_booleans_are_deprecated_aliases_warned_once(tmp_path, caplog, value, policy):
    schema._warn_recompute_alias.cache_clear()
    path = write(tmp_path, {"train": {"recompute": value}})
    with caplog.at_level(logging.WARNING, logger="sbtrain.config.schema"):
        assert load_config(path).train.recompute == policy
        assert load_config(path, [f"train.recompute={str(value).lower()}"]).train.recompute == policy
        assert TrainConfig(recompute=value).recompute == policy
    warnings = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert warnings == [f"train.recompute: {str(value).lower()} is deprecated; write "
                        f"train.recompute: {policy}"]


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("maybe", "unknown policy 'maybe'; known: none, selective, full, auto"),
     ("Full", "unknown policy 'Full'"),
     ("true ", "unknown policy 'true '"),
     (1, "matches none of"),
     ([], "matches none of")],
)
def test_bad_values_name_key_and_file(tmp_path, value, fragment):
    path = write(tmp_path, {"train": {"recompute": value}})
    err = load_error(path)
    assert_names(err, "train.recompute", path)
    assert fragment in str(err), str(err)


def test_bad_value_in_a_stage_names_the_stage(tmp_path):
    path = write(tmp_path, {"checkpoint": {"save_dir": str(tmp_path / "ckpt")},
                            "stages": [{"name": "long", "overrides": {"train.recompute": "most"}}]})
    err = load_error(path)
    assert_names(err, "train.recompute", path)
    assert "in stage 'long'" in str(err)


def test_example_configs_use_policy_names():
    for path in sorted(EXAMPLES.glob("*.yaml")):
        text = path.read_text()
        assert "recompute: true" not in text and "recompute: false" not in text, path
        load_config(path)


def test_device_memory_key_is_checked(tmp_path):
    assert load_config(write(tmp_path, {"profiler": {"device_memory_gib": 139}})
                       ).profiler.device_memory_gib == 139.0
    err = load_error(write(tmp_path, {"profiler": {"device_memory_gib": -1}}, "neg.yaml"))
    assert_names(err, "profiler.device_memory_gib")


# --------------------------------------------------------------------------- Megatron mapping


def tconfig(policy: str):
    cfg = RunConfig()
    cfg.train = TrainConfig(recompute=policy)
    return to_megatron_config(cfg, torch.float32)


def test_none_maps_to_no_recompute():
    assert recompute_fields("none") == {}
    config = tconfig("none")
    assert config.recompute_granularity is None and config.recompute_method is None


def test_full_maps_to_uniform_one_layer_checkpoints():
    config = tconfig("full")
    assert (config.recompute_granularity, config.recompute_method,
            config.recompute_num_layers) == ("full", "uniform", 1)


def test_selective_maps_to_selective_without_megatron_modules():
    """The mixers checkpoint their own cores; Megatron's core_attn/mlp/layernorm stay off."""
    config = tconfig("selective")
    assert config.recompute_granularity == "selective"
    assert config.recompute_modules == [] and config.recompute_num_layers is None


def test_unresolved_auto_is_refused():
    with pytest.raises(ValueError, match="must be resolved"):
        recompute_fields("auto")
    with pytest.raises(ValueError, match="must be resolved"):
        tconfig("auto")


def test_megatron_norm_recompute_still_takes_the_fp8_path():
    """Why selective leaves Megatron's ``layernorm`` module out (megatron_config.py): its
    output-discarding checkpoint believes fp8 is on when it is off, and its fp8 path needs
    Transformer Engine (FP8GlobalStateManager). When this fails, ``layernorm`` can join."""
    from megatron.core.tensor_parallel import CheckpointWithoutOutput

    assert CheckpointWithoutOutput().fp8 is True
    assert CheckpointWithoutOutput(fp8=False).fp8 is True

"""Zero, negative and out-of-range values are config errors naming the key and the file
(reliability.md: ZeroDivisionError deep in Megatron, torch's message for Adam betas, a
negative warm-up accepted, ``split: 100,0,0`` with eval on; issue 17's new keys)."""

from __future__ import annotations

import pytest

from sbtrain.config import ConfigError, load_config, validate

CASES = [
    ("train.log_interval=0", "train.log_interval", "must be >= 1"),
    ("train.eval_iters=0", "train.eval_iters", "must be >= 1"),
    ("train.eval_interval=-1", "train.eval_interval", "must be >= 0"),
    ("model.num_attention_heads=0", "model.num_attention_heads", "must be >= 1"),
    ("model.hidden_size=0", "model.hidden_size", "must be >= 1"),
    ("model.vocab_size=0", "model.vocab_size", "must be >= 1"),
    ("optim.adam_beta1=1.5", "optim.adam_beta1", "need 0 <= adam_beta1 < 1"),
    ("optim.adam_beta2=-0.1", "optim.adam_beta2", "need 0 <= adam_beta2 < 1"),
    ("optim.adam_eps=0", "optim.adam_eps", "must be > 0"),
    ("optim.warmup_iters=-5", "optim.warmup_iters", "must be >= 0"),
    ("checkpoint.save_interval=-1", "checkpoint.save_interval", "must be >= 0"),
    ("train.max_skipped_steps=0", "train.max_skipped_steps", "must be >= 1"),
    ("train.loss_spike_factor=0.5", "train.loss_spike_factor", "must be 0 (off) or > 1"),
    ("train.exit_signals=[SIGKILL]", "train.exit_signals", "uncatchable signal 'SIGKILL'"),
    ("train.exit_signals=SIGTERM", "train.exit_signals", "expected a list"),
    ("train.exit_duration_minutes=-1", "train.exit_duration_minutes", "must be >= 0"),
    ("train.hang_timeout_minutes=-1", "train.hang_timeout_minutes", "must be >= 0"),
    ("parallel.timeout_minutes=0", "parallel.timeout_minutes", "must be > 0"),
    ("parallel.sp_softmax_exchange=ring", "parallel.sp_softmax_exchange",
     "unknown exchange 'ring'; known: tails, halo, ulysses, auto"),
]


@pytest.fixture()
def config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  seq_length: 16\n")
    return path


@pytest.mark.parametrize("override, key, message", CASES)
def test_out_of_range_value_names_key_and_file(config_file, override, key, message):
    with pytest.raises(ConfigError) as info:
        load_config(config_file, [override])
    assert info.value.key == key and message in info.value.message
    assert str(config_file) in str(info.value)


def test_sp_softmax_exchange_values_load(config_file):
    assert load_config(config_file).parallel.sp_softmax_exchange == "tails"      # the default
    for value in ("tails", "halo", "ulysses", "auto"):
        cfg = load_config(config_file, [f"parallel.sp_softmax_exchange={value}"])
        assert cfg.parallel.sp_softmax_exchange == value


def test_new_safety_keys_load(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  exit_signals: [SIGUSR2]\n  exit_duration_minutes: 90\n"
                    "  loss_spike_factor: 4\nparallel:\n  timeout_minutes: 30\n")
    cfg = load_config(path)
    assert cfg.train.exit_signals == ["SIGUSR2"] and cfg.train.exit_duration_minutes == 90.0
    assert cfg.train.loss_spike_factor == 4.0 and cfg.parallel.timeout_minutes == 30.0


@pytest.mark.parametrize("split, message", [("100,0,0", "gives the validation part nothing"),
                                            ("a,b", "comma-separated weights"),
                                            ("1,1,1,1", "up to three")])
def test_split_without_validation_data_with_eval_on(config_file, split, message):
    cfg = load_config(config_file, ["data.kind=indexed", "data.paths=[x]", "data.tokenizer=t",
                                    "train.eval_interval=5", f"data.split={split}"])
    with pytest.raises(ConfigError, match=message) as info:
        validate(cfg, 1, str(config_file))
    assert info.value.key == "data.split"


def test_sp_early_exchange_is_a_bool(config_file):
    assert load_config(config_file).parallel.sp_early_exchange is True  # the default
    assert load_config(config_file, ["parallel.sp_early_exchange=false"]).parallel.sp_early_exchange is False
    with pytest.raises(ConfigError) as info:
        load_config(config_file, ["parallel.sp_early_exchange=sometimes"])
    assert info.value.key == "parallel.sp_early_exchange" and str(config_file) in str(info.value)

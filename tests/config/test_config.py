"""sbtrain.config: strict YAML loading, ``--set`` overrides, cross-section validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from sbtrain.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    dump_config,
    load_config,
    parse_pattern,
    validate,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIGS = sorted((REPO / "examples" / "configs").glob("*.yaml"))


def write(tmp_path: Path, data, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def load_error(path: Path, overrides: list[str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value


def assert_names(err: ConfigError, key: str, source: Path | str | None = None) -> None:
    """The error carries the dotted key (and file), and its message says them."""
    assert err.key == key, (err.key, str(err))
    assert f"'{key}'" in str(err), str(err)
    if source is not None:
        assert err.source == str(source)
        assert str(err).startswith(f"{source}: "), str(err)


# --------------------------------------------------------------------------- loading


def loaded_defaults() -> RunConfig:
    """RunConfig() as load_config returns it: data.start_tokens -1 resolved (no stages: 0)."""
    defaults = RunConfig()
    return dataclasses.replace(defaults, data=dataclasses.replace(defaults.data, start_tokens=0))


def test_minimal_file_gives_defaults(tmp_path: Path):
    assert load_config(write(tmp_path, "")) == loaded_defaults()
    cfg = load_config(write(tmp_path, {"model": {"hidden_size": 128}}))
    assert cfg.model.hidden_size == 128
    assert dataclasses.replace(cfg, model=ModelConfig()) == loaded_defaults()


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("data", "key", "suggestion"),
    [
        ({"model": {"hidden_sizes": 64}}, "model.hidden_sizes", "model.hidden_size"),
        ({"modle": {"hidden_size": 64}}, "modle", "model"),
        ({"model": {"moe": {"num_expert": 8}}}, "model.moe.num_expert", "model.moe.num_experts"),
        ({"optim": {"learning_rate": 1e-3}}, "optim.learning_rate", None),
    ],
)
def test_unknown_key_names_key_suggestion_and_file(tmp_path: Path, data, key, suggestion):
    path = write(tmp_path, data)
    err = load_error(path)
    assert_names(err, key, path)
    assert "unknown key" in err.message
    if suggestion:
        assert f"did you mean '{suggestion}'?" in str(err)
    else:
        assert "did you mean" not in str(err)


@pytest.mark.parametrize(
    ("data", "key", "expected"),
    [
        ({"model": {"hidden_size": "64"}}, "model.hidden_size", "expected int, got str '64'"),
        ({"model": {"hidden_size": 64.0}}, "model.hidden_size", "expected int, got float"),
        ({"model": {"hidden_size": True}}, "model.hidden_size", "expected int, got bool"),
        ({"model": {"qkv_bias": 1}}, "model.qkv_bias", "expected bool, got int"),
        ({"optim": {"lr": "fast"}}, "optim.lr", "expected float, got str 'fast'"),
        ({"optim": {"lr": False}}, "optim.lr", "expected float, got bool"),
        ({"train": {"run_dir": 5}}, "train.run_dir", "expected str, got int"),
        ({"model": {"moe": {"top_k": "1"}}}, "model.moe.top_k", "expected int"),
        ({"data": {"paths": "a/b"}}, "data.paths", "expected a list, got str"),
        ({"data": {"paths": ["a", 3]}}, "data.paths[1]", "expected str, got int"),
        ({"data": {"weights": [0.5, "x"]}}, "data.weights[1]", "expected float"),
    ],
)
def test_wrong_type_names_key_and_file(tmp_path: Path, data, key, expected):
    path = write(tmp_path, data)
    err = load_error(path)
    assert_names(err, key, path)
    assert expected in err.message, err.message


def test_numbers_accepted_for_floats(tmp_path: Path):
    # YAML 1.1 reads 3e-4 (no dot) as a string; float fields take numeric strings and ints.
    cfg = load_config(write(tmp_path, "optim:\n  lr: 3e-4\n  min_lr: 0\n  clip_grad: 1\n"))
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.min_lr == 0.0 and isinstance(cfg.optim.min_lr, float)
    assert cfg.optim.clip_grad == 1.0 and isinstance(cfg.optim.clip_grad, float)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"model": 5}, "model"),
        ({"model": [1, 2]}, "model"),
        ({"model": {"moe": 3}}, "model.moe"),
        ({"parallel": "tp2"}, "parallel"),
    ],
)
def test_section_given_a_scalar(tmp_path: Path, data, key):
    path = write(tmp_path, data)
    err = load_error(path)
    assert_names(err, key, path)
    assert "expected a mapping" in err.message


def test_unreadable_or_invalid_files(tmp_path: Path):
    missing = tmp_path / "nope.yaml"
    err = load_error(missing)
    assert err.source == str(missing) and "cannot read config" in str(err)
    bad = write(tmp_path, "model: [1, 2\n", "bad.yaml")
    err = load_error(bad)
    assert err.source == str(bad) and "invalid YAML" in str(err)
    listed = write(tmp_path, "- model\n- train\n", "list.yaml")
    err = load_error(listed)
    assert err.source == str(listed) and "top level must be a mapping" in str(err)


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        ({"model": {"moe": {"top_k": 5, "num_experts": 4}}}, "model.moe.top_k", "top_k"),
        ({"model": {"moe": {"dispatcher": "flex"}}}, "model.moe.dispatcher", "'flex'"),
        ({"model": {"num_query_groups": 3}}, "model.num_query_groups", "num_query_groups"),
        ({"model": {"hidden_size": 30}}, "model.num_attention_heads", "head_dim"),
        ({"parallel": {"tp": 0}}, "parallel.tp", ">= 1"),
        ({"parallel": {"dp": -1}}, "parallel.dp", ">= 0"),
        ({"train": {"precision": "fp16"}}, "train.precision", "'fp16'"),
        ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size", ">= 1"),
        ({"optim": {"lr": 1e-4, "min_lr": 1e-3}}, "optim.lr", "min_lr <= lr"),
        ({"data": {"kind": "webdataset"}}, "data.kind", "'webdataset'"),
        ({"data": {"paths": ["a", "b"], "weights": [1.0]}}, "data.weights", "one weight per path"),
    ],
)
def test_section_rules_name_the_full_key(tmp_path: Path, data, key, fragment):
    path = write(tmp_path, data)
    err = load_error(path)
    assert_names(err, key, path)
    assert fragment in err.message, err.message


def test_head_dim_allows_indivisible_hidden(tmp_path: Path):
    cfg = load_config(write(tmp_path, {"model": {"hidden_size": 30, "head_dim": 8}}))
    assert cfg.model.kv_channels == 8


# --------------------------------------------------------------------------- --set overrides


def test_overrides_are_typed(tmp_path: Path):
    path = write(tmp_path, {"model": {"moe": {"num_experts": 4}}, "optim": {"lr": 3.0e-4}})
    cfg = load_config(path, [
        "model.hidden_size=128",
        "optim.lr=1e-4",
        "optim.weight_decay=0.05",
        "train.recompute=true",
        "optim.distributed_optimizer=false",
        "train.run_dir=/tmp/some run",
        "model.moe.num_experts=8",
        "model.moe.dispatcher=allgather",
        "model.pattern=*-*E",
        "data.paths=[a, b]",
    ])
    assert cfg.model.hidden_size == 128 and isinstance(cfg.model.hidden_size, int)
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == pytest.approx(0.05)
    assert cfg.train.recompute == "full"
    assert cfg.optim.distributed_optimizer is False
    assert cfg.train.run_dir == "/tmp/some run"
    assert cfg.model.moe.num_experts == 8
    assert cfg.model.moe.dispatcher == "allgather"
    assert cfg.model.pattern == "*-*E" and cfg.model.layers == [("*", "-"), ("*", "E")]
    assert cfg.data.paths == ["a", "b"]


def test_renamed_key_is_read_with_a_warning(tmp_path: Path, caplog):
    """parallel.sequence_parallel (Megatron's TP-SP) is now parallel.tp_sequence_parallel: the old
    name still loads, from the file and from --set; both names at once is an error naming the key."""
    with caplog.at_level("WARNING", logger="sbtrain.config"):
        cfg = load_config(write(tmp_path, {"parallel": {"sequence_parallel": True}}))
    assert cfg.parallel.tp_sequence_parallel is True
    assert "parallel.sequence_parallel is deprecated; write parallel.tp_sequence_parallel" in caplog.text
    assert load_config(write(tmp_path, ""), ["parallel.sequence_parallel=true"]).parallel.tp_sequence_parallel
    both = write(tmp_path, {"parallel": {"sequence_parallel": True, "tp_sequence_parallel": False}})
    assert_names(load_error(both), "parallel.sequence_parallel", both)


def test_override_wins_over_file_and_later_wins(tmp_path: Path):
    path = write(tmp_path, {"train": {"seq_length": 64}})
    assert load_config(path, ["train.seq_length=32"]).train.seq_length == 32
    assert load_config(path, ["train.seq_length=32", "train.seq_length=16"]).train.seq_length == 16
    assert load_config(path, []).train.seq_length == 64


def test_override_creates_missing_sections(tmp_path: Path):
    cfg = load_config(write(tmp_path, ""), ["model.moe.top_k=2", "parallel.tp=2"])
    assert cfg.model.moe.top_k == 2 and cfg.parallel.tp == 2


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("optim.lr", "optim.lr", "must look like section.key=value"),
        ("optim.lrr=1e-3", "optim.lrr", "did you mean 'optim.lr'?"),
        ("model.hidden_size=big", "model.hidden_size", "expected int, got str 'big'"),
        ("train.recompute=maybe", "train.recompute", "unknown policy 'maybe'"),
        ("model.moe.top_k=1.5", "model.moe.top_k", "expected int, got float"),
        ("optim.lr.warm=1", "optim.lr.warm", "is not a section"),
        ("model.moe=3", "model.moe", "expected a mapping"),
    ],
)
def test_bad_overrides(tmp_path: Path, override, key, fragment):
    path = write(tmp_path, {"optim": {"lr": 1e-3}})
    err = load_error(path, [override])
    assert_names(err, key, path)
    assert fragment in str(err), str(err)


# --------------------------------------------------------------------------- patterns


def test_parse_pattern():
    assert parse_pattern("*-*E") == [("*", "-"), ("*", "E")]
    assert parse_pattern(" L-W- | L-WE ") == [("L", "-"), ("W", "-"), ("L", "-"), ("W", "E")]
    assert ModelConfig(pattern="*-*E*-").num_layers == 3
    assert ModelConfig(pattern="*-*E").has_moe and not ModelConfig(pattern="*-*-").has_moe


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        ("*-*", "odd number of symbols"),
        ("*-|*", "odd number of symbols"),
        ("X-", "unknown mixer symbol 'X'"),
        ("*Z", "unknown FFN symbol 'Z'"),
        ("-*", "unknown mixer symbol '-'"),
        ("", "describes no layers"),
        (" | ", "describes no layers"),
    ],
)
def test_pattern_errors(tmp_path: Path, pattern, fragment):
    path = write(tmp_path, {"model": {"pattern": pattern}})
    err = load_error(path)
    assert_names(err, "model.pattern", path)
    assert fragment in err.message, err.message


# --------------------------------------------------------------------------- validate


def cfg_with(pattern: str = "*-*-", model=None, moe=None, parallel=None, train=None, data=None):
    return RunConfig(
        model=ModelConfig(pattern=pattern, moe=MoEConfig(**(moe or {})), **(model or {})),
        parallel=ParallelConfig(**(parallel or {})),
        train=TrainConfig(**(train or {})),
        data=DataConfig(**(data or {})),
    )


def validate_error(cfg: RunConfig, world: int, source: str = "") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        validate(cfg, world, source)
    return info.value


@pytest.mark.parametrize(
    ("cfg", "world", "key", "fragment"),
    [
        (cfg_with(parallel={"tp": 2}), 3, "parallel", "not divisible by pp*tp*sp = 2"),
        (cfg_with(parallel={"pp": 2, "tp": 2}), 6, "parallel", "= 4"),
        (cfg_with(parallel={"dp": 2}), 4, "parallel.dp", "dp*pp*tp*sp = 2*1*1*1 = 2"),
        (cfg_with(parallel={"dp": 2, "tp": 2}, train={"global_batch_size": 8}), 8,
         "parallel.dp", "the world size is 8"),
        (cfg_with("*E", parallel={"ep": 4}), 2, "parallel.ep", "ep=4 must divide dp*sp = 2"),
        (cfg_with("*E", parallel={"ep": 2, "tp": 2, "tp_sequence_parallel": True}), 2,
         "parallel.ep", "dp*sp = 1"),
        (cfg_with("*-*-", parallel={"ep": 2}), 2, "parallel.ep", "no MoE"),
        (cfg_with("*E", moe={"num_experts": 3}, parallel={"ep": 2}), 2,
         "model.moe.num_experts", "num_experts=3 must divide by ep=2"),
        (cfg_with("*-*-*-", parallel={"pp": 2}), 2, "parallel.pp", "3 layers"),
        (cfg_with(model={"num_query_groups": 1}, parallel={"tp": 2}), 2, "parallel.tp", "tp=2"),
        (cfg_with(model={"hidden_size": 48, "num_attention_heads": 6, "num_query_groups": 6},
                  parallel={"tp": 4}, train={"global_batch_size": 2}), 4, "parallel.tp", "tp=4"),
        (cfg_with("*-*E", parallel={"tp": 2}), 2, "parallel.tp_sequence_parallel", "MoE"),
        (cfg_with(parallel={"tp_sequence_parallel": True}), 1, "parallel.tp_sequence_parallel",
         "needs tp > 1"),
        (cfg_with(parallel={"sp": 4}, train={"seq_length": 66}), 4, "train.seq_length", "sp = 4"),
        (cfg_with("L-*E", parallel={"tp": 2, "ep": 2, "tp_sequence_parallel": True}), 4,
         "parallel.tp_sequence_parallel", "linear-attention layers"),
        (cfg_with("H-*E", parallel={"tp": 2, "ep": 2, "tp_sequence_parallel": True}), 4,
         "parallel.tp_sequence_parallel", "linear-attention layers"),
        (cfg_with("*-*E", model={"sink_tokens": 4},
                  parallel={"tp": 2, "ep": 2, "tp_sequence_parallel": True}), 4,
         "parallel.tp_sequence_parallel", "sink_tokens"),
        (cfg_with(parallel={"tp": 2, "sp": 2, "tp_sequence_parallel": True}), 4,
         "parallel.tp_sequence_parallel", "sp > 1 together with"),
        (cfg_with(train={"micro_batch_size": 2, "global_batch_size": 6}), 2,
         "train.global_batch_size", "micro_batch_size*dp = 4"),
        (cfg_with(train={"micro_batch_size": 3, "global_batch_size": 4}), 1,
         "train.global_batch_size", "not a multiple"),
        (cfg_with(model={"max_position_embeddings": 32}, train={"seq_length": 64}), 1,
         "train.seq_length", "max_position_embeddings"),
        (cfg_with(data={"kind": "indexed", "tokenizer": "tok.json"}), 1, "data.paths", "path"),
        (cfg_with(data={"kind": "indexed", "paths": ["corpus_text_document"]}), 1,
         "data.tokenizer", "tokenizer"),
    ],
)
def test_validate_names_the_key(cfg, world, key, fragment):
    err = validate_error(cfg, world)
    assert_names(err, key)
    assert fragment in err.message, err.message


def test_validate_names_the_file():
    err = validate_error(cfg_with(parallel={"tp": 2}), 3, source="configs/x.yaml")
    assert_names(err, "parallel", "configs/x.yaml")


@pytest.mark.parametrize(
    ("cfg", "world"),
    [
        (cfg_with(), 1),
        (cfg_with(), 2),  # dp inferred: 2
        (cfg_with("*-*E", parallel={"ep": 2}), 2),
        (cfg_with("*-*E", parallel={"pp": 2, "ep": 2}, train={"global_batch_size": 4}), 4),
        (cfg_with("*-*E", parallel={"tp": 2, "ep": 2, "tp_sequence_parallel": True}), 4),
        (cfg_with(parallel={"dp": 2, "pp": 2}), 4),
        (cfg_with(data={"kind": "indexed", "paths": ["p"], "tokenizer": "t.json"}), 1),
    ],
)
def test_valid_layouts_pass(cfg, world):
    validate(cfg, world)


@pytest.mark.parametrize(
    ("pattern", "pp"),
    [
        ("*-|*-*-*-", 2),  # cut after layer 1, the even split cuts after layer 2
        ("*-*-|*-*-", 4),  # one cut, four stages
        ("*|-*-", 2),  # cut inside a layer's (mixer, ffn) pair
    ],
)
def test_pipeline_cuts_must_match_the_even_split(pattern, pp):
    cfg = cfg_with(pattern, parallel={"pp": pp}, train={"global_batch_size": 2})
    err = validate_error(cfg, pp)
    assert err.key == "model.pattern"


# --------------------------------------------------------------------------- round trip


def test_dump_then_load_round_trips(tmp_path: Path):
    cfg = cfg_with(
        "*-*E*-*E",
        model={"hidden_size": 96, "num_attention_heads": 6, "num_query_groups": 3,
               "rope_theta": 10000.0, "qkv_bias": False},
        moe={"num_experts": 8, "top_k": 2, "dispatcher": "allgather", "aux_loss_coeff": 1e-3},
        parallel={"pp": 2, "ep": 2},
        train={"seq_length": 128, "precision": "fp32", "run_dir": "runs/x y"},
        data={"kind": "indexed", "paths": ["a/b_text_document", "c"], "weights": [0.25, 0.75],
              "tokenizer": "tok.json"},
    )
    cfg.optim.lr, cfg.optim.min_lr = 1e-4, 1e-5
    cfg.data.start_tokens = 0  # as resolved by load_config (-1 means "after earlier stages")
    path = tmp_path / "out" / "resolved.yaml"
    dump_config(cfg, path)
    assert load_config(path) == cfg
    assert load_config(path) != RunConfig()
    # Every field is written, defaults included, and the file is plain YAML.
    raw = yaml.safe_load(path.read_text())
    assert set(raw) == {f.name for f in dataclasses.fields(RunConfig)}
    assert set(raw["model"]["moe"]) == {f.name for f in dataclasses.fields(MoEConfig)}
    dump_config(RunConfig(), tmp_path / "defaults.yaml")
    assert load_config(tmp_path / "defaults.yaml") == loaded_defaults()


# --------------------------------------------------------------------------- shipped configs


def test_there_are_example_configs():
    assert EXAMPLE_CONFIGS, "examples/configs/*.yaml is empty"


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=[p.name for p in EXAMPLE_CONFIGS])
def test_example_config_loads_and_validates(path: Path):
    cfg = load_config(path)
    p = cfg.parallel
    world = (p.dp or 1) * p.pp * p.tp * p.sp
    validate(cfg, world, str(path))
    assert cfg.model.num_layers >= 1

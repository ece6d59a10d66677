"""Strict YAML -> RunConfig loading, ``--set a.b=c`` overrides, and writing the resolved config."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from sbtrain.config.errors import ConfigError
from sbtrain.config.schema import RunConfig
from sbtrain.config.stages import apply_stage, read_stages

logger = logging.getLogger("sbtrain.config")

# Keys renamed since they shipped: old dotted key -> new field name in the same section. The old
# name is still read (with a warning) so existing YAML files and --set lines keep working.
RENAMED_KEYS = {"parallel.sequence_parallel": "tp_sequence_parallel"}


def load_config(path: str | Path, overrides: list[str] | None = None,
                stage: str | None = None) -> RunConfig:
    """Read ``path``, apply stage ``stage`` and then ``overrides`` (``a.b=c``); return a
    checked RunConfig. Every stage of the file is checked too, so a typo in a later stage
    fails at the first launch. Any problem raises ConfigError naming the key and the file.
    """
    source = str(path)
    raw = _read_yaml(path)
    try:
        stages = read_stages(raw)
        for item in stages:
            _check_stage(raw, stages, item.name)
        if stage is not None:
            # --set of the stage's base paths applies before the stage adds /NAME to them
            # (else every stage would share one save_dir and later stages train 0 steps)
            for item in overrides or []:
                apply_override(raw, item)
            raw = apply_stage(raw, stages, stage)
        for item in overrides or []:
            if stage is None or _override_key(item) not in STAGE_BASE_PATHS:
                apply_override(raw, item)
        cfg = from_dict(RunConfig, raw)
    except ConfigError as exc:
        raise exc.with_source(source) from None
    if cfg.data.start_tokens == -1:
        names = [s.name for s in stages]
        start = _stream_end(path, overrides, names[:names.index(stage)]) if stage else 0
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, start_tokens=start))
    return cfg


def _stream_end(path: str | Path, overrides: list[str] | None, earlier: list[str]) -> int:
    """Tokens of the training stream that the stages ``earlier`` (in order) end at: stage k
    starts there (``data.start_tokens``), not at the samples stage k-1 already trained on."""
    if not earlier:
        return 0
    prev = load_config(path, overrides, stage=earlier[-1])
    t = prev.train
    return prev.data.start_tokens + t.train_iters * t.global_batch_size * t.seq_length


# Keys a stage extends with its name (sbtrain.config.stages): --set gives their base.
STAGE_BASE_PATHS = ("train.run_dir", "checkpoint.save_dir")


def _override_key(item: str) -> str:
    return item.split("=", 1)[0].strip()


def stage_names(path: str | Path) -> list[str]:
    """The names of the ``stages`` in the YAML at ``path``, in order (empty if none)."""
    try:
        return [s.name for s in read_stages(_read_yaml(path))]
    except ConfigError as exc:
        raise exc.with_source(str(path)) from None


def _read_yaml(path: str | Path) -> dict:
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", source=source) from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", source=source) from None
    if not isinstance(raw, dict):
        raise ConfigError("top level must be a mapping of sections", source=source)
    return raw


def _check_stage(raw: dict, stages: list, name: str) -> None:
    try:
        from_dict(RunConfig, apply_stage(raw, stages, name))
    except ConfigError as exc:
        raise ConfigError(f"in stage {name!r}: {exc.message}", key=exc.key) from None


def apply_override(raw: dict, item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (so 3, 1e-4, true work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value", key=item)
    dotted, value = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError("is not a section", key=dotted)
    try:
        node[keys[-1]] = yaml.safe_load(value)
    except yaml.YAMLError:
        # Not valid YAML on its own (e.g. a pattern such as "*-*E"): take it as a string.
        node[keys[-1]] = value


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping, got {type(raw).__name__}", key=prefix.rstrip("."))
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in _renamed(raw, prefix).items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key{hint}", key=dotted)
        kwargs[key] = _coerce(hints[key], value, dotted)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if exc.key and prefix and not exc.key.startswith(prefix):
            raise ConfigError(exc.message, key=prefix + exc.key.split(".")[-1]) from None
        raise


def _renamed(raw: dict, prefix: str) -> dict:
    """``raw`` with the renamed keys of this section under their new names (warns once each)."""
    out = dict(raw)
    for key in raw:
        new = RENAMED_KEYS.get(f"{prefix}{key}")
        if new is None:
            continue
        if new in raw:
            raise ConfigError(f"both the old name and {prefix}{new} are set; keep {prefix}{new}",
                              key=f"{prefix}{key}")
        logger.warning("%s%s is deprecated; write %s%s", prefix, key, prefix, new)
        out[new] = out.pop(key)
    return out


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=key + ".")
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"expected a list, got {type(value).__name__}", key=key)
        (item_type,) = typing.get_args(hint)
        return [_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"value {value!r} matches none of {hint}", key=key)
    return _scalar(hint, value, key)


def _scalar(hint: Any, value: Any, key: str) -> Any:
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        # YAML reads "3e-4" (no dot) as a string; accept numeric strings for floats only.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"unsupported field type {hint}", key=key)
    raise ConfigError(f"expected {hint.__name__}, got {type(value).__name__} {value!r}", key=key)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the fully resolved config (every default filled in) as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

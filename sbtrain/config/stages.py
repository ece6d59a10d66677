"""Staged training from one YAML: a ``stages`` list of named override sets.

    stages:
      - name: cpt-8k
        overrides: {train.seq_length: 8192, train.train_iters: 12000}
      - name: cpt-32k
        overrides: {train.seq_length: 32768, parallel.sp: 4}

Stage ``k`` is the base config with its overrides applied, its own ``train.run_dir/<name>``
and ``checkpoint.save_dir/<name>``, and (unless it sets ``checkpoint.pretrained`` itself)
the weights of stage ``k-1``'s newest checkpoint as its starting point: each stage has its
own LR warm-up and schedule, as in SpikingBrain's 8K -> 32K -> 128K continual pre-training.
Stages run as separate launches (``sbtrain train CONFIG --stage NAME``, looped by the
example scripts), so each can use its own parallel layout; a finished stage resumes to its
end at once, which makes the loop restartable.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

from sbtrain.config.errors import ConfigError


@dataclasses.dataclass
class Stage:
    name: str
    overrides: dict[str, Any]


def read_stages(raw: dict) -> list[Stage]:
    """Pop and check the ``stages`` list of a raw YAML mapping (empty when absent)."""
    items = raw.pop("stages", None) or []
    if not isinstance(items, list):
        raise ConfigError("expected a list of {name, overrides}", key="stages")
    stages: list[Stage] = []
    for i, item in enumerate(items):
        key = f"stages[{i}]"
        if not isinstance(item, dict) or set(item) - {"name", "overrides"} or "name" not in item:
            raise ConfigError("each stage is a mapping with 'name' and 'overrides'", key=key)
        name, overrides = str(item["name"]), item.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise ConfigError("expected a mapping of section.key: value", key=f"{key}.overrides")
        if any(s.name == name for s in stages) or "/" in name or name == "all":
            # 'all' is `sbtrain train --stage all` (every stage in order)
            raise ConfigError(f"stage name {name!r} is repeated, contains '/' or is the "
                              "reserved 'all'", key=f"{key}.name")
        stages.append(Stage(name, overrides))
    return stages


def apply_stage(raw: dict, stages: list[Stage], name: str) -> dict:
    """A copy of ``raw`` configured as stage ``name`` (see module docstring)."""
    names = [s.name for s in stages]
    if name not in names:
        raise ConfigError(f"unknown stage {name!r}; this config has {names}", key="stages")
    index = names.index(name)
    raw = copy.deepcopy(raw)
    train, checkpoint = raw.setdefault("train", {}), raw.setdefault("checkpoint", {})
    base_save = checkpoint.get("save_dir")
    if not base_save:
        raise ConfigError("staged training needs checkpoint.save_dir (one sub-directory per "
                          "stage, each starting from the previous one)", key="checkpoint.save_dir")
    train["run_dir"] = os.path.join(train.get("run_dir", "runs/default"), name)
    checkpoint["save_dir"] = os.path.join(base_save, name)
    if index > 0:
        checkpoint["pretrained"] = os.path.join(base_save, names[index - 1])
    for dotted, value in stages[index].overrides.items():
        _set_dotted(raw, str(dotted), value, f"stages[{index}].overrides")
    return raw


def _set_dotted(raw: dict, dotted: str, value: Any, where: str) -> None:
    *sections, leaf = dotted.split(".")
    node = raw
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{section!r} is not a section", key=f"{where}.{dotted}")
    node[leaf] = value

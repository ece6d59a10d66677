"""In-process multi-rank checks: many cases on ``world`` gloo ranks in ONE ``mp.spawn``.

Whole training runs go through torchrun (``tests/parallel/harness.py``: ``run``, ``run_many``);
op-level checks (a function of rank and world that builds its own inputs and asserts) go
through ``spawn_cases``: a spawn costs ~3 s of imports per rank on the 2-core CI machine, a
case a fraction of a second, so the cases that share a world size share the ranks. Each case
gets its own pass/fail: ``results[case]`` is "" or the first failing rank's traceback.

The op test modules in :data:`SPAWN_MODULES` go further: each declares ``spawn_plan()``
(``{world: {case: (check, *args)}}``) and reads its results from the session's
:class:`SpawnPool`, which runs every listed module's cases of one world size in ONE spawn.
"""

from __future__ import annotations

import datetime
import importlib
import json
import traceback
from pathlib import Path
from typing import Callable

import torch.distributed as dist
import torch.multiprocessing as mp

CASE_TIMEOUT = datetime.timedelta(seconds=120)
"""A rank whose peer failed mid-collective gives up after this long (gloo waits 30 min)."""


def _ranks_main(rank: int, world: int, out_dir: str, cases: dict[str, tuple]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank,
                            world_size=world, timeout=CASE_TIMEOUT)
    results = {}
    try:
        for name, (check, *args) in cases.items():
            try:
                check(rank, world, *args)
                results[name] = ""
            except Exception:  # noqa: BLE001 - reported per case by the test
                results[name] = f"rank {rank}:\n{traceback.format_exc()}"
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


def spawn_cases(tmp: Path, world: int, cases: dict[str, tuple[Callable, ...]]) -> dict[str, str]:
    """``check(rank, world, *args)`` for every ``cases[name] = (check, *args)``, in order, on
    ``world`` gloo ranks in one spawn (each ``check`` a module-level function that asserts);
    returns ``{name: "" or the first failing rank's traceback}``."""
    out = Path(tmp) / f"spawn{world}"
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_ranks_main, args=(world, str(out), cases), nprocs=world, join=True)
    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    failures = {name: [r.get(name, f"rank {i}: no result") for i, r in enumerate(per_rank)]
                for name in cases}
    return {name: next((text for text in texts if text), "") for name, texts in failures.items()}


SPAWN_MODULES = ("test_attention_sequence_parallel", "test_gla_sequence_parallel",
                 "test_attention_ulysses", "test_sp_block_masks")
"""Test modules (tests/ops, imported by their file names as pytest does) whose cases share the
pool's spawns."""


class SpawnPool:
    """One :func:`spawn_cases` per world size for the cases of every :data:`SPAWN_MODULES`
    module, run on first use (``tests/conftest.py``'s ``spawn_pool`` fixture)."""

    def __init__(self, directory: Callable[[str], Path]) -> None:
        self._directory = directory
        self._results: dict[int, dict[str, str]] = {}

    def results(self, module: str, world: int) -> dict[str, str]:
        """``module``'s cases on ``world`` ranks: ``{case: "" or the failing traceback}``."""
        if module not in SPAWN_MODULES:
            raise ValueError(f"{module} is not in tests/parallel/ranks.py SPAWN_MODULES")
        if world not in self._results:
            cases = {}
            for name in SPAWN_MODULES:
                plan = importlib.import_module(name).spawn_plan().get(world, {})
                cases.update({f"{name}::{case}": spec for case, spec in plan.items()})
            self._results[world] = spawn_cases(self._directory(f"spawn_pool{world}"), world, cases)
        prefix = f"{module}::"
        return {key[len(prefix):]: text for key, text in self._results[world].items()
                if key.startswith(prefix)}


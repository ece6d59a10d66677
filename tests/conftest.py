"""Suite-wide settings: CPU runs never compile (megatron wraps fusions in torch.compile)."""

import json
import os

import pytest

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("SB_PLATFORM", "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA/MACA GPU (run with -m gpu)")
    config.addinivalue_line("markers", "multigpu: needs 2 or more CUDA/MACA GPUs (run with -m multigpu)")


def pytest_collection_modifyitems(config, items):
    import pytest
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skips = {"gpu": (gpus < 1, "needs a CUDA/MACA GPU"), "multigpu": (gpus < 2, f"needs 2+ GPUs, found {gpus}")}
    for marker, (missing, reason) in skips.items():
        if not missing:
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


# Single-process reference curves, trained once per test session and shared by every module
# that compares a layout (or a resumed / guarded run) against the same config: each launch
# costs seconds of imports.
@pytest.fixture(scope="session")
def one_process_curve(tmp_path_factory):
    """``one_process_curve(overrides)``: the metrics of a one-rank run of the tiny config."""
    from tests.parallel.harness import run  # the harness imports yaml: only for tests that launch

    cache: dict[str, list[dict]] = {}

    def curve(overrides: dict) -> list[dict]:
        key = json.dumps(overrides, sort_keys=True)
        if key not in cache:
            cache[key] = run(tmp_path_factory.mktemp("one_process"), "one", 1, overrides)
        return cache[key]

    return curve

"""Suite-wide settings: CPU runs never compile (megatron wraps fusions in torch.compile)."""

import os

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

"""Suite-wide settings: CPU runs never compile (megatron wraps fusions in torch.compile)."""

import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("SB_PLATFORM", "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA/MACA GPU (run with -m gpu)")


def pytest_collection_modifyitems(config, items):
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA/MACA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

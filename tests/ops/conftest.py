"""Fixtures shared by the op tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def compile_enabled(monkeypatch: pytest.MonkeyPatch):
    """The suite sets TORCH_COMPILE_DISABLE=1; flex needs torch.compile (dynamo reads the flag per call)."""
    import torch._dynamo as dynamo

    monkeypatch.setattr(dynamo.config, "disable", False)
    # Many (dtype, batch, mask) variants in one process; production sees a handful.
    monkeypatch.setattr(dynamo.config, "recompile_limit", 64, raising=False)

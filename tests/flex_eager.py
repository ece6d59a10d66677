"""flex_attention run eagerly on CPU, with autograd, for tests.

The suite disables torch.compile, and public flex_attention then fails (it compiles internally
with fullgraph=True) and refuses CPU backward. Its debug switch calls the flex higher-order op
eagerly: the dense math path, which applies the same mask_mod (but ignores the tile lists;
tests/ops/test_attention.py's test_block_structure_* check those) and differentiates the
returned lse. ``eager_flex`` (tests/conftest.py) sets the switches for one test; spawned
ranks call :func:`enable_eager_flex`.
"""

from __future__ import annotations

from types import ModuleType

import pytest


def flex_module() -> ModuleType:
    """torch's flex_attention module; skips the test where it has no eager debug path."""
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    if not hasattr(fa, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG") or not hasattr(fa, "_validate_device"):
        pytest.skip("this torch has no eager flex_attention debug path")
    return fa


def eager_switches() -> dict[str, object]:
    """The module attributes that make flex_attention run eagerly on CPU."""
    return {"_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG": True, "_validate_device": lambda *args: None}


def enable_eager_flex():
    """Set the switches for the rest of this process (a spawned rank); returns flex_attention."""
    fa = flex_module()
    for name, value in eager_switches().items():
        setattr(fa, name, value)
    return fa.flex_attention

"""sbtrain.console: the reviewed QUIET list hides exactly the third-party messages it names, only
the logging rank speaks, sbtrain's INFO lines are shown there, SB_LOG_LEVEL / --verbose bring
everything back. In-process, no launch."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from sbtrain.console import QUIET, quiet_matches, setup_console

# The messages as megatron-core 0.19.2 / torch 2.13 print them (first run, 2 CPU ranks).
SEEN = [
    "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
    "Apex is not installed. Falling back to Torch Norm",
    "absl.logging is not installed. Using logging.getLogger(__name__) instead.",
    "full scope is deprecated. Use empty cuda_graph_modules to capture the whole layer.",
    "MimoModelConfig is experimental and still under active development.",
    "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed.",
    "`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...",
    "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ...",
    "GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes",
    "DistributedDataParallel: full_param_layout not provided with use_distributed_optimizer=True.",
    "MCore's async save is deprecated and will be removed in the future releases.",
    "save_common is deprecated and will be removed in a future release.",
    "Triton is not supported on current platform, roll back to CPU.",
    "torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load "
    "in a single process.",
    "The argument order of load has been changed. Please check the document to avoid future "
    "breakages.",
    "Please use DTensor instead and we are deprecating ShardedTensor.",
]


@pytest.fixture(autouse=True)
def clean_logging():
    """setup_console changes process-wide state: restore it after each test."""
    root, ours = logging.getLogger(), logging.getLogger("sbtrain")
    handlers, root_level, our_level = list(root.handlers), root.level, ours.level
    with warnings.catch_warnings():
        yield
    root.handlers[:] = handlers
    root.setLevel(root_level)
    ours.setLevel(our_level)


def rank(monkeypatch, r: int, world: int = 2) -> None:
    monkeypatch.setenv("RANK", str(r))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.delenv("SB_LOG_LEVEL", raising=False)


def shown_warnings(messages: list[str]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        for m in messages:
            warnings.warn(m, UserWarning if "deprecated" not in m else FutureWarning)
    return [str(w.message) for w in caught]


def test_every_entry_has_a_reason_and_names_a_seen_message():
    assert all(q.reason and q.kind in ("warning", "log") for q in QUIET)
    for q in QUIET:
        assert any(q in quiet_matches(m) for m in SEEN), f"{q.pattern} matches nothing seen"
    assert all(quiet_matches(m) for m in SEEN)


def test_logging_rank_hides_the_list_and_shows_the_rest(monkeypatch):
    rank(monkeypatch, 1)
    stream = io.StringIO()
    setup_console(stream=stream)
    warning_texts = [m for m in SEEN if any(q.kind == "warning" for q in quiet_matches(m))]
    assert shown_warnings(warning_texts + ["something new"]) == ["something new"]
    megatron = logging.getLogger("megatron.core.models.gpt.gpt_model")
    megatron.warning(SEEN[8])
    megatron.warning("a real megatron warning")
    logging.getLogger("sbtrain.train").info("layout: 2 ranks")
    logging.getLogger("sbtrain.train").debug("not at INFO")
    lines = stream.getvalue().splitlines()
    assert lines == ["warning [megatron.core.models.gpt.gpt_model]: a real megatron warning",
                     "layout: 2 ranks"]


def test_other_ranks_stay_quiet_but_errors_pass(monkeypatch):
    rank(monkeypatch, 0)
    stream = io.StringIO()
    setup_console(stream=stream)
    assert shown_warnings(["something new"]) == []  # shown once, by the logging rank
    logging.getLogger("sbtrain.train").info("layout: 2 ranks")
    logging.getLogger("megatron.core").error("broken")
    assert stream.getvalue().splitlines() == ["error [megatron.core]: broken"]


@pytest.mark.parametrize("how", ["env", "verbose"])
def test_debug_shows_everything(monkeypatch, how):
    rank(monkeypatch, 0)
    if how == "env":
        monkeypatch.setenv("SB_LOG_LEVEL", "debug")
    stream = io.StringIO()
    assert setup_console(verbose=how == "verbose", stream=stream) == logging.DEBUG
    assert shown_warnings([SEEN[0]]) == [SEEN[0]]
    logging.getLogger("megatron.core").warning(SEEN[8])
    assert SEEN[8] in stream.getvalue()


def test_bad_log_level_names_the_variable(monkeypatch):
    monkeypatch.setenv("SB_LOG_LEVEL", "LOUD")
    with pytest.raises(ValueError, match="SB_LOG_LEVEL"):
        setup_console()

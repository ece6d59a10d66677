"""What sbtrain's commands print: the one reviewed list of third-party messages hidden from the
console, and the logging setup of the entry points.

Applied only by entry points (``sbtrain`` CLI, ``python -m sbtrain.train``, the example
scripts' Python side) through ``setup_console``; importing this module changes nothing.

- Every entry of ``QUIET`` names one third-party message (a ``warnings.warn`` or a log record)
  and why it is noise for sbtrain's users. ``--verbose`` or ``SB_LOG_LEVEL=DEBUG`` shows them
  again. Re-check the list on every megatron-core / torch bump (``tests/test_console.py``
  checks each entry against the message it names).
- Under torchrun only the logging rank (the last one: it holds the loss) shows warnings, so an
  import-time warning appears once, not once per rank; errors are still printed by every rank
  that has one.
- sbtrain's own loggers (``sbtrain.*``: platform, shims, op backends, layout, data, resume) log
  INFO on the logging rank; ``SB_LOG_LEVEL`` (DEBUG, INFO, WARNING, ERROR) changes the level.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Quiet:
    """One hidden third-party message: ``pattern`` is a regex matched at the message's start."""

    pattern: str
    kind: str
    """``warning`` (``warnings.warn``) or ``log`` (a ``logging`` record, any level below ERROR)."""
    reason: str


QUIET: tuple[Quiet, ...] = (
    Quiet(r"Transformer Engine and Apex are not installed", "warning",
          "megatron-core (optimizer, clip_grads, megatron_fsdp) on import: sbtrain runs without "
          "TE/Apex by design (MetaX and CPU have neither); the torch fallbacks are the path it "
          "tests"),
    Quiet(r"Apex is not installed\. Falling back to Torch Norm", "warning",
          "megatron-core layer specs: torch norms are sbtrain's norms"),
    Quiet(r"absl\.logging is not installed", "warning",
          "megatron-core hyper_comm_grid on import: falls back to the logging module"),
    Quiet(r"full scope is deprecated", "warning",
          "megatron-core 0.19.2 TransformerConfig warns on its own default cuda_graph_scope; "
          "sbtrain does not capture CUDA graphs"),
    Quiet(r"MimoModelConfig is experimental", "warning",
          "megatron-core imports its MIMO config while loading dist_checkpointing; unused"),
    Quiet(r"The \.grad attribute of a Tensor that is not a leaf Tensor", "warning",
          "megatron-core optimizer.py probes hasattr(param, 'grad') on bf16 views; harmless"),
    Quiet(r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
          "warning",
          "FutureWarning of torch 2.13 on the collectives megatron-core 0.19.2 calls"),
    Quiet(r"GPTModel IS DEPRECATED", "log",
          "megatron-core 0.19.2 logs it for every GPTModel; sbtrain builds its hybrids on "
          "GPTModel deliberately (docs/architecture.md)"),
    Quiet(r"DistributedDataParallel: full_param_layout not provided", "log",
          "DDP computing the distributed optimizer's layout itself is what sbtrain wants"),
    Quiet(r"MCore's async save is deprecated", "log",
          "logged on every dist_checkpointing save, also synchronous ones"),
    Quiet(r"(save|load)_common is deprecated", "log",
          "dist_checkpointing's own calls in 0.19.2"),
    Quiet(r"Triton is not supported on current platform", "warning",
          "fla-core on import without a GPU (sbtrain generate's HF modeling code imports it "
          "optionally); the plain-torch path is what runs on CPU"),
    Quiet(r"torch\.distributed is disabled, unavailable or uninitialized", "warning",
          "torch DCP when sbtrain generate loads a distributed checkpoint into one process, "
          "which is what it means to do"),
    Quiet(r"The argument order of load has been changed", "warning",
          "torch DCP on megatron-core 0.19.2's positional call of its load"),
    Quiet(r"Please use DTensor instead and we are deprecating ShardedTensor", "warning",
          "torch DCP's planner on megatron-core 0.19.2's ShardedTensor checkpoints"),
)


def env_rank() -> tuple[int, int]:
    """(rank, world size) of this process as torchrun sets them; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_logging_rank() -> bool:
    """The last rank logs (it holds the loss under pipeline parallelism), as the trainer does."""
    rank, world = env_rank()
    return rank == world - 1


def log_level(verbose: bool = False) -> int:
    """``SB_LOG_LEVEL`` if set (a level name), DEBUG with ``--verbose``, else INFO."""
    name = os.environ.get("SB_LOG_LEVEL", "").strip().upper()
    if name:
        level = logging.getLevelName(name)
        if not isinstance(level, int):
            raise ValueError(f"SB_LOG_LEVEL={name!r}: expected DEBUG, INFO, WARNING or ERROR")
        return level
    return logging.DEBUG if verbose else logging.INFO


class _QuietFilter(logging.Filter):
    """Drops the ``log`` entries of QUIET (ERROR and above always pass)."""

    def __init__(self, entries: tuple[Quiet, ...]) -> None:
        super().__init__()
        self._patterns = [re.compile(q.pattern) for q in entries if q.kind == "log"]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        message = record.getMessage()
        return not any(p.match(message) for p in self._patterns)


class _Formatter(logging.Formatter):
    """sbtrain's INFO lines as plain text; anything else with its level and logger."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno == logging.INFO and record.name.startswith("sbtrain"):
            return message
        return f"{record.levelname.lower()} [{record.name}]: {message}"


_HANDLER_NAME = "sbtrain-console"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time, not the object it was when set up
    (a redirected or replaced stderr, e.g. pytest's capture, is never written after closing)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def setup_console(verbose: bool = False, stream=None) -> int:
    """Apply QUIET and the logging setup to this process; returns sbtrain's log level.

    Idempotent: a second call replaces the first one's handler."""
    level = log_level(verbose)
    show_all = verbose or level <= logging.DEBUG
    if not show_all:
        if is_logging_rank():
            for q in QUIET:
                if q.kind == "warning":
                    warnings.filterwarnings("ignore", message=q.pattern)
        else:
            # the logging rank shows each warning once; the others would repeat it
            warnings.simplefilter("ignore")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(_Formatter())
    if not show_all:
        handler.addFilter(_QuietFilter(QUIET))
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    ours = logging.getLogger("sbtrain")
    ours.setLevel(level if is_logging_rank() else max(level, logging.WARNING))
    return level


def quiet_matches(message: str) -> list[Quiet]:
    """The QUIET entries that hide ``message`` (tests and reviews of the list)."""
    return [q for q in QUIET if re.match(q.pattern, message)]

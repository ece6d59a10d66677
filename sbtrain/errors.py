"""Errors whose cause is known: ``sbtrain train`` prints them as one ``error: ...`` line that
names the file, key or checkpoint, and exits non-zero without a traceback (``--verbose``
shows it). Each also subclasses the builtin type it replaced, so callers catching
``ValueError`` / ``FileNotFoundError`` / ``RuntimeError`` keep working."""

from __future__ import annotations


class KnownCause(Exception):
    """Mixin marking an error whose message already says what is wrong and where."""


class DataError(KnownCause, ValueError):
    """A dataset or tokenizer file exists but cannot be used (truncated, empty, mismatched)."""


class DataFileNotFound(KnownCause, FileNotFoundError):
    """A dataset or tokenizer path that does not exist."""


class CheckpointError(KnownCause, RuntimeError):
    """A checkpoint that exists but cannot be resumed from (dangling ``latest``, layout)."""


class CheckpointNotFound(KnownCause, FileNotFoundError):
    """No complete checkpoint where one is required (load_dir, pretrained)."""


class MetricsFileExists(KnownCause, FileExistsError):
    """A fresh run (nothing to resume) into a run directory that has another run's metrics."""


class OptionalPackageMissing(KnownCause, ImportError):
    """A config key asks for an optional package (tensorboard, wandb) that is not installed."""

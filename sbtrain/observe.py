"""What a run leaves to look at: ``metrics.jsonl`` and the sinks fed from the same records
(TensorBoard, Weights & Biases), ``torch.profiler`` traces of chosen steps, a CUDA memory
snapshot, and ``metrics.png`` at the end (``sbtrain.tools.plot``).

One metrics file per run: a run that resumes a checkpoint (start step > 0) appends to the run
directory's ``metrics.jsonl`` (its first record carries ``resumed_from``; steps after it that
the interrupted run had already logged are logged again, and readers keep the last record of
a step); a fresh run (step 0) into a run directory whose ``metrics.jsonl`` exists is refused,
so two runs never mix silently.

Only the logging rank writes metrics, sinks and the plot; traces are per rank.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from sbtrain.config import RunConfig
from sbtrain.config.load import to_dict
from sbtrain.errors import MetricsFileExists, OptionalPackageMissing

logger = logging.getLogger("sbtrain.train")
METRICS = "metrics.jsonl"


class RunObserver:
    """Built on every rank after resume (``start_step`` known); all methods are cheap no-ops
    where there is nothing to do."""

    def __init__(self, cfg: RunConfig, start_step: int, is_logging_rank: bool,
                 device: torch.device, rank: int) -> None:
        self.cfg, self.is_logging_rank, self.device, self.rank = cfg, is_logging_rank, device, rank
        self.run_dir = Path(cfg.train.run_dir)
        self.metrics_path = self.run_dir / METRICS
        _refuse_mixing(self.metrics_path, start_step, is_logging_rank, device)
        p = cfg.profiler
        self.sinks = _open_sinks(cfg, self.run_dir) if is_logging_rank else []
        self.trace = StepTrace(p.trace_steps, self.run_dir / "traces", rank, device)
        self.memory = MemorySnapshot(p.memory_snapshot, self.run_dir / "memory", rank, device)

    def step_begins(self, step: int) -> None:
        """``step`` counts from 1, as in metrics.jsonl."""
        self.trace.step_begins(step)

    def step_ends(self, step: int) -> None:
        self.trace.step_ends(step)

    def write(self, record: dict) -> None:
        """One step's record: a metrics.jsonl line, and the same numbers to every sink."""
        if not self.is_logging_rank:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: float(v) for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
                   and math.isfinite(v)}
        for sink in self.sinks:
            sink.log(scalars, record["step"])

    def close(self) -> None:
        self.trace.close()
        self.memory.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def plot(self) -> None:
        """``metrics.png`` of this run (logging rank); one line instead when matplotlib is
        missing."""
        if not self.is_logging_rank or not self.metrics_path.is_file():
            return
        try:
            import matplotlib  # noqa: F401  (optional: only the plot needs it)
        except ImportError:
            print("metrics.png not drawn: matplotlib is not installed", flush=True)
            return
        # deferred: matplotlib is optional and only the end-of-run figure needs it
        from sbtrain.tools.plot import plot_runs

        print(f"curves: {plot_runs([str(self.run_dir)], str(self.run_dir / 'metrics.png'))}",
              flush=True)


def _refuse_mixing(path: Path, start_step: int, is_logging_rank: bool,
                   device: torch.device) -> None:
    """A fresh run (step 0) must not append to another run's metrics.jsonl; every rank learns
    the logging rank's answer (the file may live on its node only)."""
    exists = torch.tensor([float(is_logging_rank and start_step == 0 and path.exists())],
                          device=device)
    dist.all_reduce(exists)
    if exists.item():
        raise MetricsFileExists(
            f"{path} already exists and this run starts at step 0 (no checkpoint to resume): "
            "set train.run_dir to a new directory, or move that file away; a run that resumes "
            "from a checkpoint continues it")


# --- sinks ------------------------------------------------------------------------------------

class TensorBoardSink:
    """Scalars under ``RUN_DIR/tensorboard``; the resolved config as text."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        try:
            # optional extra (pip install tensorboard): imported only when profiler.tensorboard
            # deferred: tensorboard is optional (observe.tensorboard)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise OptionalPackageMissing(
                "profiler.tensorboard is true but the tensorboard package is not installed "
                "(pip install tensorboard)") from exc
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        text = json.dumps(to_dict(cfg), indent=2)
        self.writer.add_text("config", "```\n" + text + "\n```", 0)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run in ``RUN_DIR`` (``profiler.wandb_mode: offline`` needs no network; ``wandb
    sync RUN_DIR/wandb/offline-run-*`` uploads it later). Its id is kept in
    ``RUN_DIR/wandb_run_id``, so a resumed run continues the same W&B run."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        try:
            import wandb  # optional extra (pip install wandb): only when profiler.wandb
        except ImportError as exc:
            raise OptionalPackageMissing(
                "profiler.wandb is true but the wandb package is not installed "
                "(pip install wandb)") from exc
        p = cfg.profiler
        self.wandb = wandb
        id_file = run_dir / "wandb_run_id"
        if not id_file.is_file():
            id_file.write_text(uuid.uuid4().hex[:12])
        self.run = wandb.init(project=p.wandb_project, name=run_dir.name, dir=str(run_dir),
                              mode=p.wandb_mode, config=to_dict(cfg),
                              id=id_file.read_text().strip(), resume="allow")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def _open_sinks(cfg: RunConfig, run_dir: Path) -> list:
    run_dir.mkdir(parents=True, exist_ok=True)
    sinks = []
    if cfg.profiler.tensorboard:
        sinks.append(TensorBoardSink(cfg, run_dir))
    if cfg.profiler.wandb:
        sinks.append(WandbSink(cfg, run_dir))
    return sinks


# --- traces -----------------------------------------------------------------------------------

class StepTrace:
    """``profiler.trace_steps: [a, b]``: a ``torch.profiler`` trace of steps a..b (inclusive,
    counted from 1) per rank, as ``traces/rank<R>_steps<a>-<b>.json`` (Chrome trace format:
    chrome://tracing or https://ui.perfetto.dev)."""

    def __init__(self, steps: list[int], out_dir: Path, rank: int, device: torch.device) -> None:
        self.first, self.last = (steps or [0, 0])
        self.out_dir, self.rank, self.device = out_dir, rank, device
        self.profile = None

    def step_begins(self, step: int) -> None:
        if step != self.first or not self.first:
            return
        # deferred: the torch profiler loads kineto; only a profiled run needs it
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self.profile = profile(activities=activities, record_shapes=True, profile_memory=True)
        self.profile.__enter__()

    def step_ends(self, step: int) -> None:
        if self.profile is not None and step >= self.last:
            self._finish()

    def close(self) -> None:
        """The run ended inside the window: write what was traced."""
        if self.profile is not None:
            self._finish()

    def _finish(self) -> None:
        self.profile.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{self.rank}_steps{self.first}-{self.last}.json"
        self.profile.export_chrome_trace(str(path))
        self.profile = None
        if self.rank == 0:
            print(f"profiler trace of steps {self.first}-{self.last}: {path}", flush=True)


class MemorySnapshot:
    """``profiler.memory_snapshot``: record the CUDA caching allocator's history from the start
    and dump it (``memory/rank<R>_oom.pickle`` on an out-of-memory error, ``rank<R>_end.pickle``
    at the end of training); drag it into https://pytorch.org/memory_viz. CPU: one note."""

    def __init__(self, enabled: bool, out_dir: Path, rank: int, device: torch.device) -> None:
        self.enabled, self.out_dir, self.rank = False, out_dir, rank
        if not enabled:
            return
        memory = getattr(torch.cuda, "memory", None)
        if device.type != "cuda" or not hasattr(memory, "_record_memory_history"):
            if rank == 0:
                print(f"profiler.memory_snapshot: not supported on {device.type} (no CUDA "
                      "allocator); nothing recorded", flush=True)
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            memory._record_memory_history(max_entries=100_000)
        except RuntimeError as exc:  # an allocator without history (e.g. some vendor builds)
            if rank == 0:
                print(f"profiler.memory_snapshot: not supported here ({exc}); nothing recorded",
                      flush=True)
            return
        self.enabled = True
        # torch's hook for allocator OOMs (the one torchtitan uses); absent on some builds
        attach = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)
        if attach is not None:
            attach(self._on_oom)

    def _on_oom(self, device, alloc, device_alloc, device_free) -> None:
        self._dump("oom")

    def _dump(self, tag: str) -> None:
        path = self.out_dir / f"rank{self.rank}_{tag}.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        print(f"rank {self.rank}: CUDA memory snapshot {path}", flush=True)

    def close(self) -> None:
        if self.enabled:
            self._dump("end")
            torch.cuda.memory._record_memory_history(enabled=None)
            self.enabled = False

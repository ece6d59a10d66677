"""metrics.jsonl policy, the W&B / TensorBoard sinks, traces on CPU, step sections and
``sbtrain plot`` (no launches: a one-process gloo group where a collective is needed)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
import torch.distributed as dist

from sbtrain.cli import main as cli_main
from sbtrain.config import RunConfig
from sbtrain.errors import MetricsFileExists, OptionalPackageMissing
from sbtrain.observe import MemorySnapshot, RunObserver, StepTrace, WandbSink
from sbtrain.profiler.tracker import ThroughputTracker
from sbtrain.tools.plot import plot_runs, read_metrics

CPU = torch.device("cpu")


@pytest.fixture
def gloo(tmp_path):
    if dist.is_initialized():  # an earlier in-process test's one-rank group: use it
        assert dist.get_world_size() == 1
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def _cfg(run_dir, **profiler) -> RunConfig:
    cfg = RunConfig()
    cfg.train.run_dir = str(run_dir)
    for key, value in profiler.items():
        setattr(cfg.profiler, key, value)
    return cfg


def _write(run_dir, records):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_fresh_run_refuses_existing_metrics_and_resumed_run_appends(tmp_path, gloo):
    run_dir = tmp_path / "run"
    _write(run_dir, [{"step": 1, "loss": 5.0}])
    with pytest.raises(MetricsFileExists, match="metrics.jsonl already exists.*train.run_dir"):
        RunObserver(_cfg(run_dir), 0, True, CPU, 0)
    observer = RunObserver(_cfg(run_dir), 1, True, CPU, 0)  # resumes step 1
    observer.write({"step": 2, "loss": 4.0, "resumed_from": 1})
    observer.close()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    # a fresh run into a new directory starts its own file
    RunObserver(_cfg(tmp_path / "new"), 0, True, CPU, 0).write({"step": 1, "loss": 3.0})
    assert json.loads((tmp_path / "new" / "metrics.jsonl").read_text()) == {"step": 1, "loss": 3.0}


def test_wandb_sink_gets_the_metrics_record_and_the_resolved_config(tmp_path, monkeypatch, gloo):
    calls = {}

    class FakeRun:
        def log(self, data, step):
            calls.setdefault("log", []).append((data, step))

        def finish(self):
            calls["finish"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    cfg = _cfg(tmp_path / "run", wandb=True, wandb_project="proj")
    observer = RunObserver(cfg, 0, True, CPU, 0)
    assert isinstance(observer.sinks[0], WandbSink)
    record = {"step": 3, "loss": 4.5, "lr": 1e-3, "grad_norm": float("nan"), "skipped": "nan"}
    observer.write(record)
    observer.close()
    assert calls["init"]["mode"] == "offline" and calls["init"]["project"] == "proj"
    # the same W&B run id again when the run resumes
    assert calls["init"]["id"] == (tmp_path / "run" / "wandb_run_id").read_text()
    assert calls["init"]["resume"] == "allow"
    assert calls["init"]["config"]["train"]["run_dir"] == str(tmp_path / "run")
    assert calls["init"]["config"]["profiler"]["wandb"] is True
    # the numbers of the metrics.jsonl line (non-finite and text left out), at its step
    assert calls["log"] == [({"loss": 4.5, "lr": 1e-3}, 3)]
    assert calls["finish"]
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["loss"] == 4.5


def test_missing_optional_packages_are_one_clear_error(tmp_path, monkeypatch, gloo):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(OptionalPackageMissing, match="profiler.wandb .*pip install wandb"):
        RunObserver(_cfg(tmp_path / "w", wandb=True), 0, True, CPU, 0)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(OptionalPackageMissing, match="pip install tensorboard"):
        RunObserver(_cfg(tmp_path / "t", tensorboard=True), 0, True, CPU, 0)


def test_tensorboard_sink_writes_the_scalars(tmp_path, gloo):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    observer = RunObserver(_cfg(tmp_path / "run", tensorboard=True), 0, True, CPU, 0)
    observer.write({"step": 1, "loss": 4.0})
    observer.write({"step": 2, "loss": 3.5})
    observer.close()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 4.0), (2, 3.5)]


def test_trace_of_chosen_steps_on_cpu_and_memory_snapshot_note(tmp_path, capsys):
    trace = StepTrace([2, 3], tmp_path / "traces", 0, CPU)
    for step in range(1, 5):
        trace.step_begins(step)
        torch.ones(8, 8).matmul(torch.ones(8, 8))
        trace.step_ends(step)
    events = json.loads((tmp_path / "traces" / "rank0_steps2-3.json").read_text())["traceEvents"]
    assert sum(e.get("name") == "aten::matmul" for e in events) == 2  # steps 2 and 3 only
    snapshot = MemorySnapshot(True, tmp_path / "memory", 0, CPU)
    snapshot.close()
    assert not snapshot.enabled and not (tmp_path / "memory").exists()
    assert "profiler.memory_snapshot: not supported on cpu" in capsys.readouterr().out


def test_nested_sections_do_not_overlap_and_checkpoint_time_joins_the_step():
    now = [0.0]
    tracker = ThroughputTracker(1.0, 0.0, "", 1, "cpu", clock=lambda: now[0], sync=False)
    tracker.start_step()
    with tracker.section("forward_backward"):
        now[0] += 1.0
        with tracker.section("data_wait", parent="forward_backward", sync=False):
            now[0] += 0.25
        with tracker.section("grad_reduce", parent="forward_backward"):
            now[0] += 0.5
    with tracker.section("optimizer"):
        now[0] += 0.125
    stats = tracker.end_step(tokens=10)
    tracker.add_after_step("checkpoint", 2.0)
    assert stats.sections_s == {"forward_backward": 1.0, "data_wait": 0.25, "grad_reduce": 0.5,
                                "optimizer": 0.125, "checkpoint": 2.0}
    assert stats.step_time_s == 1.875  # the save's blocking time is not part of the step
    assert tracker.summary()["sections_s"]["checkpoint"]["mean"] == 2.0


def test_plot_keeps_the_last_record_of_each_step_and_overlays_runs(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    _write(first, [{"step": 1, "loss": 5.0, "lr": 1e-3, "mfu": 0.1},
                   {"step": 2, "loss": 9.0, "eval_loss": 9.5},  # lost: no checkpoint at 2
                   {"step": 2, "loss": 4.0, "resumed_from": 1, "tokens_per_s": 10.0},
                   {"step": 3, "loss": 3.0, "grad_norm": float("nan")}])
    _write(second, [{"step": 1, "loss": 6.0}])
    records, resumes = read_metrics(first)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 5.0), (2, 4.0), (3, 3.0)]
    assert resumes == [1]
    out = plot_runs([str(first), str(second)], str(tmp_path / "both.png"))
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.endswith(".png")
    assert cli_main(["plot", str(first)]) == 0
    assert (first / "metrics.png").stat().st_size > 10_000
    assert cli_main(["plot", str(tmp_path / "missing")]) == 1

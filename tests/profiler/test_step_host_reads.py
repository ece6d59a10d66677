"""Host reads of device values inside a training step (issue 15, no host stalls in the step):
the loss reduction reads once (it read once per micro-batch and once per group) with the same
number, the step guard's gradient check stays on the device until the guard's one read, still
naming the rank with non-finite gradients, and the spike recorder of logged steps sums on the
device. One-rank gloo group, in-process."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from sbtrain.safety import StepGuard, StopRequest
from sbtrain.spiking.layers import FiringRecorder, recording
from sbtrain.trainer import Trainer

CPU = torch.device("cpu")
READS = ("cpu", "item", "tolist", "__float__", "__bool__", "__int__")


# every test here runs inside a one-rank gloo group (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_rank_group")


class HostReads:
    """Counts the ways a tensor's values reach the host (on a GPU each one waits for the
    device); reads of a ``.cpu()`` copy are not counted again."""

    def __init__(self, monkeypatch) -> None:
        self.count, self._copies = 0, []
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))

    def _counted(self, name: str, read):
        def counted(tensor, *args, **kwargs):
            if not any(tensor is c or tensor._base is c for c in self._copies):
                self.count += 1
            out = read(tensor, *args, **kwargs)
            if name == "cpu":
                self._copies.append(out)
            return out

        return counted


def old_reduce_loss(losses: list[dict]) -> float:
    """The loss reduction as it was (one process): a host float per micro-batch."""
    local = torch.zeros(2, dtype=torch.float64)
    local[0] = sum(float(x["lm loss"]) for x in losses)
    local[1] = len(losses)
    return float(local[0] / local[1])


def test_loss_reduction_reads_once_and_gives_the_same_number(monkeypatch):
    world = dist.group.WORLD
    trainer = Trainer.__new__(Trainer)
    trainer.state = SimpleNamespace(device=CPU, groups=SimpleNamespace(
        is_last_stage=True, pg_collection=SimpleNamespace(pp=world, cp=world, dp=world)))
    values = torch.rand(8, generator=torch.Generator().manual_seed(0), dtype=torch.float32) * 10
    losses = [{"lm loss": v.clone()} for v in values]
    expected = old_reduce_loss(losses)
    reads = HostReads(monkeypatch)
    loss = trainer._reduce_loss(losses)
    assert reads.count == 1  # was 8 micro-batches + 3 groups + 2
    monkeypatch.undo()
    assert loss == expected  # bit for bit: the same float64 additions in the same order
    assert trainer._local_loss == sum(float(v) for v in values)


class GradBuffers:
    """What StepGuard reads of Megatron's DDP model: its gradient buffers."""

    def __init__(self, *grads: torch.Tensor) -> None:
        self.buffers = [SimpleNamespace(grad_data=g) for g in grads]


@pytest.mark.parametrize("bad", [math.nan, math.inf, None])
def test_gradient_check_stays_on_the_device_until_the_guard_reads(monkeypatch, bad):
    grads = [torch.ones(4), torch.ones(3)]
    if bad is not None:
        grads[1][2] = bad
    guard = StepGuard(5, 0.0, GradBuffers(*grads), CPU)
    finalized = []
    reads = HostReads(monkeypatch)
    guard.wrap_finalize(lambda *a, **k: finalized.append(a))("model")
    assert reads.count == 0 and finalized == [("model",)]
    verdict = guard.check(0, 1.0, 1.0, StopRequest([], 0))
    monkeypatch.undo()
    if bad is None:
        assert verdict.skip_reason == ""
    else:
        assert verdict.skip_reason == "non-finite: loss 1, non-finite gradients on rank(s) [0]"
    # the flag is cleared with the step: the next step starts clean
    assert guard.check(1, 1.0, 1.0, StopRequest([], 0)).skip_reason == ""


def test_firing_recorder_adds_on_the_device_and_gives_the_same_totals(monkeypatch):
    """Logged steps with spiking: a host read per neuron call and micro-batch before; now the
    sums are read once, with the step's other spike statistics (Trainer._spike_stats)."""
    gen = torch.Generator().manual_seed(0)
    calls = [torch.randint(-3, 4, (5, 7), generator=gen).float() for _ in range(6)]
    expected = [0.0, 0.0, 0.0]
    for counts in calls:  # the recorder's sums as host floats, as it kept them
        expected[0] += float(counts.abs().sum())
        expected[1] += float((counts != 0).sum())
        expected[2] += counts.numel()
    with recording() as recorder:
        reads = HostReads(monkeypatch)
        for counts in calls:
            recorder.add(counts)
        assert reads.count == 0
        monkeypatch.undo()
    assert recorder.totals(CPU).tolist() == expected
    assert (recorder.abs_counts, recorder.firing, recorder.elements) == tuple(expected)
    assert FiringRecorder().totals(CPU).tolist() == [0.0, 0.0, 0.0]

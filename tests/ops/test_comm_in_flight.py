"""ops.comm's exchanges issued early (``start_all_gather``, ``start_from_previous_rank``) on one
gloo rank: what runs between issuing and waiting, forward and backward (the overlap the SP ops
rely on), the result and gradient as the blocking ops', and ``wait()`` only once. The numbers
across ranks are checked by tests/ops/test_{gla,attention}_sequence_parallel.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ops import comm


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = tmp_path_factory.mktemp("in_flight") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


class _Local(torch.autograd.Function):
    """The local kernel's stand-in: doubles its input and logs both passes."""

    @staticmethod
    def forward(ctx, x, log):
        ctx.log = log
        log.append("local forward")
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append("local backward")
        return 2 * grad, None


@pytest.fixture
def log(monkeypatch):
    """Logs every issue and wait of the in-flight exchanges."""
    events: list[str] = []
    issue, land = comm._Flight.issue, comm._Flight.land

    def logged_issue(self, half, x):
        events.append("issue")
        return issue(self, half, x)

    def logged_land(self):
        events.append("wait")
        return land(self)

    monkeypatch.setattr(comm._Flight, "issue", logged_issue)
    monkeypatch.setattr(comm._Flight, "land", logged_land)
    return events


@pytest.mark.parametrize("start", [comm.start_all_gather, comm.start_from_previous_rank])
def test_the_local_work_runs_between_issue_and_wait_in_both_passes(group, log, start):
    packet = torch.randn(3, 4, requires_grad=True)
    local_input = torch.randn(5, requires_grad=True)
    exchange = start(packet * 1.0, group)
    local = _Local.apply(local_input, log)
    received = exchange.wait()
    (received.sum() * local.sum()).backward()
    assert log == ["issue", "local forward", "wait",   # forward
                   "issue", "local backward", "wait"]  # backward: the reverse exchange
    assert packet.grad is not None and local_input.grad is not None


def test_results_and_gradients_equal_the_blocking_ops(group):
    x = torch.randn(2, 3, dtype=torch.float64)
    weight = torch.randn(1, 2, 3, dtype=torch.float64)
    for early_op, blocking_op in [(comm.start_all_gather, comm.all_gather_with_grad),
                                  (comm.start_from_previous_rank, comm.from_previous_rank)]:
        results = []
        for early in (True, False):
            leaf = x.clone().requires_grad_()
            out = early_op(leaf, group, early=early).wait()
            (out * weight.reshape(out.shape)).sum().backward()
            results.append((out.detach(), leaf.grad))
        leaf = x.clone().requires_grad_()
        out = blocking_op(leaf, group)
        (out * weight.reshape(out.shape)).sum().backward()
        for got in results:
            torch.testing.assert_close(got[0], out.detach(), rtol=0, atol=0)
            torch.testing.assert_close(got[1], leaf.grad, rtol=0, atol=0)


def test_wait_once(group):
    exchange = comm.start_all_gather(torch.ones(2), group)
    exchange.wait()
    with pytest.raises(RuntimeError, match="already called"):
        exchange.wait()

"""Every PATCHES entry is needed, and does what it says (see maca_compat/patches.py).

For each entry, the test named by its ``test`` field runs a probe of the stock megatron-core code
path (tests/maca_compat/probes.py) in processes of its own:

(a) with every entry applied except this one, the probe fails with the stock error, raised in
    the stock function the entry is about (innermost megatron-core frame of the traceback);
(b) with every entry applied, the probe succeeds and its numbers are checked.

Entries that exist for speed (STOCK_BEHAVIOUR: stock code works, slowly) replace (a) by the
stock behaviour measured with the entry reverted (per-tensor ops, host syncs, torch's default
Adam) and check that the numbers agree with the entry applied.

Tests are parametrized over ``entries_for(test name)``, so an entry added to PATCHES with an
existing test name is exercised automatically (and fails until STOCK_FAILURES names its error).
Probe jobs start in the background when the module's first probe test runs (see ProbeRunner).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from maca_compat.patches import PATCHES

REPO = Path(__file__).resolve().parents[2]
PROBE_TIMEOUT_S = 300
STOCK_CUDA_ASSERT = "AssertionError: Torch not compiled with CUDA enabled"

# probe name -> processes it needs
PROBE_NPROC = {
    "rng_tracker": 1,
    "model_device_allocations": 1,
    "moe_alltoall": 2,
    "pipeline_schedules": 1,
    "ddp_and_optimizer": 1,
    "checkpoint": 1,
    "bucketed_checkpoint": 1,
    "revert_identity": 1,
    "import_is_inert": 1,
    "fused_optim": 1,
    "wgrad_fusion": 1,
    "moe_ep1": 1,
    "empty_shard_step": 2,
}

# test function -> the probe it runs
TEST_PROBE = {
    "test_rng_tracker": "rng_tracker",
    "test_model_device_allocations": "model_device_allocations",
    "test_moe_alltoall_dispatcher": "moe_alltoall",
    "test_pipeline_schedules": "pipeline_schedules",
    "test_ddp_and_optimizer": "ddp_and_optimizer",
    "test_dist_checkpointing": "checkpoint",
    "test_distopt_load_missing_step": "checkpoint",
    "test_distopt_bucketed_state_save": "bucketed_checkpoint",
    "test_platform_adam": "fused_optim",
    "test_foreach_grad_norm_and_scale": "fused_optim",
    "test_grad_accum_fusion": "wgrad_fusion",
    "test_moe_ep1_counts_on_device": "moe_ep1",
    "test_distopt_empty_shard_step": "empty_shard_step",
}

# entry -> (the stock error, (file under megatron/core, function) of the frame that raises it)
STOCK_FAILURES = {
    "rng_tracker": (STOCK_CUDA_ASSERT, ("tensor_parallel/random.py", "add")),
    "model_device_allocations": (
        STOCK_CUDA_ASSERT, ("models/common/embeddings/rotary_pos_embedding.py", "__init__")),
    "moe_alltoall_dispatcher": (
        "RuntimeError: torch.cuda.Stream requires CUDA support",
        ("transformer/moe/token_dispatcher.py", "__init__")),
    "pipeline_schedules": (
        STOCK_CUDA_ASSERT, ("pipeline_parallel/schedules.py", "forward_backward_no_pipelining")),
    "ddp_and_optimizer_devices": (
        STOCK_CUDA_ASSERT, ("distributed/param_and_grad_buffer.py", "__init__")),
    "optimizer_cuda_type_checks": (
        "TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor",
        ("optimizer/distrib_optimizer.py", "_build_model_and_main_param_groups")),
    "dist_checkpointing_devices": (
        STOCK_CUDA_ASSERT, ("dist_checkpointing/strategies/filesystem_async.py", "preload_tensors")),
    "distopt_state_gather_on_cpu": (
        STOCK_CUDA_ASSERT, ("optimizer/distrib_optimizer.py", "get_parameter_state_dp_zero")),
    "distopt_load_missing_step": (
        "KeyError: 'step'",
        ("optimizer/distrib_optimizer.py", "_set_main_param_and_optimizer_states")),
    "grad_accum_fusion": (
        "RuntimeError: ColumnParallelLinear was called with gradient_accumulation_fusion set",
        ("tensor_parallel/layers.py", "__init__")),
    "distopt_empty_shard_step": (
        "AssertionError", ("optimizer/distrib_optimizer.py", "state_dict")),
}
# Entries for speed, or against silently wrong numbers: stock code runs without them. Their
# tests show the stock behaviour the entry replaces (with the entry reverted) and the right
# numbers with it applied.
STOCK_BEHAVIOUR = ("platform_adam", "foreach_grad_norm", "foreach_multi_tensor_scale",
                   "moe_ep1_counts_on_device", "distopt_bucketed_state_save")

# Entries made of several rebindings: undoing one part (with the entry otherwise applied)
# shows that part is needed too. entry -> [(MODULE:ATTR, stock error, raising frame)].
PART_FAILURES = {
    "moe_alltoall_dispatcher": [(
        "token_dispatcher:maybe_move_tensor_to_cpu",
        "TypeError: all_to_all_single(): incompatible function arguments",
        ("tensor_parallel/mappings.py", "forward"),
    )],
    "optimizer_cuda_type_checks": [
        ("optimizer.optimizer:clip_grad_by_total_norm_fp32",
         "assert param.grad.type() == 'torch.cuda.FloatTensor'",
         ("optimizer/clip_grads.py", "clip_grad_by_total_norm_fp32")),
        ("Float16OptimizerWithFloat16Params:__init__",
         "TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor,  "
         "torch.cuda.HalfTensor, or torch.cuda.BFloat16Tensor. Received torch.BFloat16Tensor",
         ("optimizer/optimizer.py", "__init__")),
    ],
}
# Stock _set_cuda_rng_state defers the set through torch.cuda._lazy_call, which never runs on a
# CPU build: nothing raises, the tracker silently draws from the wrong stream.
RNG_SET_PART = "random:_set_cuda_rng_state"


def entries_for(test_name: str) -> list[str]:
    return [p.name for p in PATCHES if p.test == test_name]


# --------------------------------------------------------------------------- running probes


@dataclasses.dataclass(frozen=True)
class Job:
    probe: str
    without: str | None = None
    restore: str | None = None

    def command(self) -> list[str]:
        if PROBE_NPROC[self.probe] > 1:
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                      f"--nproc_per_node={PROBE_NPROC[self.probe]}"]
        else:
            launch = [sys.executable]
        cmd = launch + ["-m", "tests.maca_compat.probes", self.probe]
        if self.without:
            cmd += ["--without", self.without]
        if self.restore:
            cmd += ["--restore", self.restore]
        return cmd


@dataclasses.dataclass
class Outcome:
    job: Job
    returncode: int
    stdout: str
    stderr: str
    seconds: float = 0.0

    @property
    def results(self) -> dict[int, dict]:
        """rank -> the probe's JSON result."""
        found = re.findall(r"^PROBE_RESULT (\d+) (.*)$", self.stdout, flags=re.M)
        return {int(rank): json.loads(text) for rank, text in found}

    @property
    def result(self) -> dict:
        assert self.returncode == 0, self.describe()
        results = self.results
        assert sorted(results) == list(range(PROBE_NPROC[self.job.probe])), self.describe()
        return results[0]

    def describe(self) -> str:
        return (f"{' '.join(self.job.command())} -> exit {self.returncode}\n"
                f"--- stdout (tail)\n{self.stdout[-2000:]}\n--- stderr (tail)\n{self.stderr[-6000:]}")


def _probe_env() -> dict[str, str]:
    return dict(os.environ, TORCH_COMPILE_DISABLE="1", SB_PLATFORM="cpu", OMP_NUM_THREADS="1",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(job: Job) -> Outcome:
    """A fresh interpreter (or torchrun) for ``job``."""
    start = time.monotonic()
    try:
        proc = subprocess.run(job.command(), cwd=REPO, env=_probe_env(), capture_output=True,
                              text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        return Outcome(job, -9, str(exc.stdout or ""), f"timed out after {PROBE_TIMEOUT_S} s")
    return Outcome(job, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)


class ForkServer:
    """``probes --serve``: single-process jobs, each in a fork of one pre-imported process."""

    def __init__(self, workdir: Path, workers: int = 2) -> None:
        self._dir = workdir
        self._log = open(workdir / "server.stderr", "w+")  # noqa: SIM115 - closed in close()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.maca_compat.probes", "--serve",
             f"--workers={workers}", f"--timeout={PROBE_TIMEOUT_S}"],
            cwd=REPO, env=_probe_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, text=True, bufsize=1,
        )
        self._lock = threading.Lock()
        self._jobs: dict[int, tuple[Job, concurrent.futures.Future]] = {}
        self._reader = threading.Thread(target=self._read_results, daemon=True)
        self._reader.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            index = len(self._jobs)
            self._jobs[index] = (job, future)
            line = json.dumps({
                "id": index, "argv": job.command()[3:],
                "stdout": str(self._dir / f"{index}.out"), "stderr": str(self._dir / f"{index}.err"),
            })
            self._proc.stdin.write(line + "\n")
            self._proc.stdin.flush()
        return future

    def _read_results(self) -> None:
        for line in self._proc.stdout:
            msg = json.loads(line)
            job, future = self._jobs[msg["id"]]
            out, err = (self._dir / f"{msg['id']}.{ext}" for ext in ("out", "err"))
            future.set_result(Outcome(job, msg["returncode"], out.read_text(), err.read_text(),
                                      msg["seconds"]))
        self._log.seek(0)
        crash = f"probe fork server exited ({self._proc.wait()}):\n{self._log.read()[-6000:]}"
        with self._lock:
            for job, future in self._jobs.values():
                if not future.done():
                    future.set_exception(RuntimeError(crash))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._reader.join(timeout=10)
        self._log.close()


def jobs_for_test(name: str, params: dict) -> list[Job]:
    """The probe runs a test of this module needs (so they can be started ahead of time)."""
    if name in TEST_PROBE:
        probe, entry = TEST_PROBE[name], params.get("entry")
        jobs = [Job(probe)]
        if entry is not None:
            jobs.append(Job(probe, without=entry))
            jobs += [Job(probe, restore=part) for part, _, _ in PART_FAILURES.get(entry, [])]
            if entry == "rng_tracker":
                jobs.append(Job(probe, restore=RNG_SET_PART))
        return jobs
    if name in ("test_unshare_adam_step_guard", "test_materialize_optimizer_state_guard"):
        return [Job("checkpoint")]
    if name == "test_revert_patches_restores_originals":
        return [Job("revert_identity")]
    if name == "test_import_applies_nothing":
        return [Job("import_is_inert")]
    return []


class ProbeRunner:
    """Runs each distinct probe job once: torchrun jobs and the import check in fresh
    interpreters (one at a time), all others through the fork server (two at a time).

    ``SB_PROBE_FRESH=1`` runs every job in a fresh interpreter instead (slower; for debugging).
    """

    FRESH_ONLY = {"import_is_inert"}

    def __init__(self, workdir: Path) -> None:
        self._fresh = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._all_fresh = os.environ.get("SB_PROBE_FRESH") == "1"
        self._server = None if self._all_fresh else ForkServer(workdir)
        self._futures: dict[Job, concurrent.futures.Future] = {}

    def submit(self, job: Job) -> concurrent.futures.Future:
        if job not in self._futures:
            if self._all_fresh or PROBE_NPROC[job.probe] > 1 or job.probe in self.FRESH_ONLY:
                self._futures[job] = self._fresh.submit(_run, job)
            else:
                self._futures[job] = self._server.submit(job)
        return self._futures[job]

    def get(self, probe: str, without: str | None = None, restore: str | None = None) -> Outcome:
        return self.submit(Job(probe, without, restore)).result(timeout=4 * PROBE_TIMEOUT_S)

    def close(self) -> None:
        for future in self._futures.values():
            future.cancel()
        self._fresh.shutdown(wait=True)
        if self._server is not None:
            self._server.close()
        if os.environ.get("SB_PROBE_TIMES"):
            for job, future in self._futures.items():
                if future.done() and not future.cancelled() and future.exception() is None:
                    print(f"\n{future.result().seconds:6.1f} s  {' '.join(job.command()[-4:])}")


@pytest.fixture(scope="module")
def probes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    runner = ProbeRunner(tmp_path_factory.mktemp("probes"))
    selected = [item for item in request.session.items
                if getattr(item, "module", None) is sys.modules[__name__]]
    jobs = [job for item in selected
            for job in jobs_for_test(item.originalname,
                                     getattr(getattr(item, "callspec", None), "params", {}))]
    # Multi-process probes first: they are the longest.
    for job in sorted(dict.fromkeys(jobs), key=lambda j: -PROBE_NPROC[j.probe]):
        runner.submit(job)
    yield runner
    runner.close()


FRAME = re.compile(r'File "[^"]*/megatron/core/([^"]+)", line \d+, in (\S+)')


def raising_frames(stderr: str, error: str) -> list[tuple[str, str]]:
    """The innermost megatron-core frame of each traceback in ``stderr`` that ends in ``error``.

    Ranks' output (``[rankN]:`` prefixes) is separated first: tracebacks of two ranks may
    interleave, and a rank killed by torchrun may leave a truncated one.
    """
    streams: dict[str, list[str]] = {}
    for line in stderr.splitlines():
        tagged = re.match(r"^\[(rank\d+)\]:(.*)$", line)
        rank, text = tagged.groups() if tagged else ("", line)
        streams.setdefault(rank, []).append(text)
    found = []
    for lines in streams.values():
        frame = None
        for text in lines:
            if "Traceback (most recent call last)" in text:
                frame = None
            match = FRAME.search(text)
            if match:
                frame = match.groups()
            elif error in text and frame is not None:
                found.append(frame)
    return found


def assert_stock_failure(outcome: Outcome, error: str, frame: tuple[str, str], what: str) -> None:
    assert outcome.returncode != 0, (
        f"the probe passed {what}: the shim looks unneeded (delete it from PATCHES?)\n"
        + outcome.describe())
    assert error in outcome.stderr, f"{what}: expected {error!r}\n" + outcome.describe()
    frames = raising_frames(outcome.stderr, error)
    assert frame in frames, (
        f"{what}: expected {error!r} raised in megatron/core/{frame[0]}:{frame[1]}, got it from "
        f"{frames}\n" + outcome.describe())


def assert_needed(probes: ProbeRunner, probe: str, entry: str) -> None:
    """(a) for ``entry`` and each of its listed parts."""
    error, frame = STOCK_FAILURES[entry]
    assert_stock_failure(probes.get(probe, without=entry), error, frame, f"without {entry}")
    for part, part_error, part_frame in PART_FAILURES.get(entry, []):
        assert_stock_failure(probes.get(probe, restore=part), part_error, part_frame,
                             f"with {entry} but its {part} rebinding undone")


def close(a: float, b: float, tol: float = 1e-6) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= tol * max(1.0, abs(b))


LN_VOCAB = math.log(128)  # loss of a near-uniform prediction: the probes' models are at init


# --------------------------------------------------------------------------- the list itself


def test_every_entry_names_a_test_here():
    module = sys.modules[__name__]
    names = [p.name for p in PATCHES]
    assert len(names) == len(set(names)), names
    for patch in PATCHES:
        assert callable(getattr(module, patch.test, None)), (
            f"PATCHES entry {patch.name!r} names {patch.test!r}, which is not a test in {__file__}")
        assert patch.test in TEST_PROBE, (patch.name, patch.test)
        assert patch.reason.strip() and patch.platforms, patch.name
    assert not set(STOCK_FAILURES) & set(STOCK_BEHAVIOUR)
    assert sorted([*STOCK_FAILURES, *STOCK_BEHAVIOUR]) == sorted(names), (
        "STOCK_FAILURES and STOCK_BEHAVIOUR must list exactly the entries")
    assert set(PART_FAILURES) <= set(names)
    # Every entry test is parametrized over exactly the entries that name it.
    for test_name in TEST_PROBE:
        marks = [m for m in getattr(getattr(module, test_name), "pytestmark", [])
                 if m.name == "parametrize"]
        if entries_for(test_name):
            assert marks and list(marks[0].args[1]) == entries_for(test_name), test_name


def test_import_applies_nothing(probes: ProbeRunner):
    result = probes.get("import_is_inert").result
    assert result == {"applied": [], "megatron_modules": []}


def test_revert_patches_restores_originals(probes: ProbeRunner):
    r = probes.get("revert_identity").result
    names = [p.name for p in PATCHES]
    assert r["applied"] == names and r["applied_twice"] == names
    assert r["entries_with_records"] == sorted(names)
    # Every rebinding took effect while applied (logger filter lists are mutated in place).
    assert r["rebound_while_applied"] == r["num_records"] - r["num_filter_records"] > 0
    assert r["shared_bindings"] == [], "two entries rebind the same name: partial revert breaks"
    assert r["silenced_while_applied"]
    # A partial revert undoes only the named entry.
    assert r["partial"] == {"applied": [n for n in names if n != "rng_tracker"],
                            "random_torch_restored": True, "schedules_torch_still_shimmed": True}
    assert r["applied_after_revert"] == []
    # Identity: every module global and class attribute of megatron is the very same object
    # as before apply_patches(); no CPU-torch stand-in or patch wrapper is left anywhere.
    assert r["num_bindings_checked"] > 5000
    assert r["changed_after_revert"] == []
    assert r["originals_not_back"] == []
    assert r["artefacts_after_revert"] == []
    assert r["filters_restored"] and r["passes_filter_after_revert"]


# --------------------------------------------------------------------------- one test per entry


@pytest.mark.parametrize("entry", entries_for("test_rng_tracker"))
def test_rng_tracker(probes: ProbeRunner, entry: str):
    assert_needed(probes, "rng_tracker", entry)
    r = probes.get("rng_tracker").result
    assert r["tracked_states"] == ["data-parallel-rng", "expert-parallel-rng",
                                   "model-parallel-rng"]
    assert r["default_draw"] == r["expected_default_draw"]
    assert r["fork_draws"] == r["expected_fork_draws"]
    # The fork restores the CPU generator exactly: the next draw is the one without the fork.
    assert r["after_fork"] == r["without_fork"]
    if entry == "rng_tracker":
        # Its _set_cuda_rng_state part: stock code never sets the state on a CPU build.
        silent = probes.get("rng_tracker", restore=RNG_SET_PART).result
        assert silent["fork_draws"] != silent["expected_fork_draws"]
        assert silent["after_fork"] != silent["without_fork"]


@pytest.mark.parametrize("entry", entries_for("test_model_device_allocations"))
def test_model_device_allocations(probes: ProbeRunner, entry: str):
    assert_needed(probes, "model_device_allocations", entry)
    r = probes.get("model_device_allocations").result
    assert r["rope_shape"] == [16, 1, 1, 8]
    assert r["rope_max_err"] == 0.0  # exactly outer(positions, inv_freq), twice
    assert abs(r["loss"] - LN_VOCAB) < 0.1, r["loss"]
    assert r["grads_finite"] and r["num_grads"] > 20


@pytest.mark.parametrize("entry", entries_for("test_moe_alltoall_dispatcher"))
def test_moe_alltoall_dispatcher(probes: ProbeRunner, entry: str):
    assert_needed(probes, "moe_alltoall", entry)
    outcome = probes.get("moe_alltoall")
    assert outcome.result  # exit status 0 and one result per rank
    results = outcome.results
    for rank, r in results.items():
        # EP2: the all-to-all dispatcher reproduces the all-gather dispatcher exactly.
        assert close(r["loss_alltoall"], r["loss_allgather"]), (rank, r)
        assert r["max_grad_diff"] <= 1e-6, (rank, r)
        assert abs(r["loss_alltoall"] - LN_VOCAB) < 0.1, (rank, r)
        assert r["num_local_experts_params"] == 4 and r["expert_grad_norm"] > 0, (rank, r)
    assert results[0]["loss_alltoall"] != results[1]["loss_alltoall"]  # ranks saw other tokens


@pytest.mark.parametrize("entry", entries_for("test_pipeline_schedules"))
def test_pipeline_schedules(probes: ProbeRunner, entry: str):
    assert_needed(probes, "pipeline_schedules", entry)
    r = probes.get("pipeline_schedules").result
    assert len(r["schedule_losses"]) == 2
    for got, want in zip(r["schedule_losses"], r["direct_losses"]):
        assert close(got, want), r
        assert abs(got - LN_VOCAB) < 0.1, r
    assert r["max_grad_diff"] <= 1e-6, r
    assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0


@pytest.mark.parametrize("entry", entries_for("test_ddp_and_optimizer"))
def test_ddp_and_optimizer(probes: ProbeRunner, entry: str):
    assert_needed(probes, "ddp_and_optimizer", entry)
    r = probes.get("ddp_and_optimizer").result
    assert r["update_successful"]
    assert close(r["grad_norm"], r["reference_grad_norm"], tol=1e-5), r
    # The first Adam step moved every parameter by lr against the sign of its gradient.
    assert r["checked_entries"] > 10_000
    assert r["max_update_err"] < 0.001 * r["lr"], r
    assert r["zero_grad_entries_moved"] == 0
    assert r["adam_steps"] == [1.0]
    assert r["loss_after_step"] < r["loss"] - 0.01, r
    # bf16 with Float16OptimizerWithFloat16Params: same model, loss to bf16 accuracy.
    assert abs(r["bf16_loss"] - r["loss"]) < 0.01 and math.isfinite(r["bf16_grad_norm"]), r
    assert r["bf16_loss_after_step"] < r["bf16_loss"] - 0.01, r


@pytest.mark.parametrize("entry", entries_for("test_dist_checkpointing"))
def test_dist_checkpointing(probes: ProbeRunner, entry: str):
    assert_needed(probes, "checkpoint", entry)
    r = probes.get("checkpoint").result
    assert r["differs_before_load"], "the fresh model must differ, or the load proves nothing"
    assert r["loaded_step"] == 1 and r["scheduler_steps"] == 1
    assert r["weights_equal"] and r["num_weights"] > 10
    assert r["adam_state_equal"]
    # The resumed run continues exactly like the uninterrupted one.
    assert r["loss_resumed"] == r["loss_continued"] and math.isfinite(r["loss_resumed"])
    assert r["params_equal_after_step"]


@pytest.mark.parametrize("entry", entries_for("test_distopt_load_missing_step"))
def test_distopt_load_missing_step(probes: ProbeRunner, entry: str):
    assert_needed(probes, "checkpoint", entry)
    r = probes.get("checkpoint").result
    assert r["loaded_step"] == 1 and r["weights_equal"] and r["adam_state_equal"]
    assert r["steps_after_one_step"] == [2.0] * r["num_adam_states"]


@pytest.mark.parametrize("entry", entries_for("test_distopt_bucketed_state_save"))
def test_distopt_bucketed_state_save(probes: ProbeRunner, entry: str):
    """Several DDP buckets (overlapped reduction): stock saves shifted optimizer state, the
    resumed run leaves the uninterrupted one; with the entry the resume is exact."""
    stock = probes.get("bucketed_checkpoint", without=entry).result
    r = probes.get("bucketed_checkpoint").result
    assert r["buckets"] == stock["buckets"] > 1
    assert not stock["adam_state_equal"] and not stock["params_equal_after_step"], stock
    # the shifted main params overwrite the loaded weights: even the first resumed loss differs
    assert stock["loss_resumed"] != stock["loss_continued"], stock
    assert r["adam_state_equal"] and r["params_equal_after_step"], r
    assert r["loss_resumed"] == r["loss_continued"] and math.isfinite(r["loss_resumed"])


@pytest.mark.parametrize("entry", entries_for("test_distopt_empty_shard_step"))
def test_distopt_empty_shard_step(probes: ProbeRunner, entry: str):
    """PP2, experts on stage 1 only: stock cannot save (stage 0's empty expert optimizer has
    no step); with the entry both stages save and load, every Adam state at the saved step
    (the expert optimizer's step comes from rank 0's empty one: 0 there would show here)."""
    assert_needed(probes, "empty_shard_step", entry)
    outcome = probes.get("empty_shard_step")
    outcome.result  # exit status 0 and one result per rank
    by_rank = outcome.results
    assert by_rank[0]["member_params"][1] == 0 < by_rank[1]["member_params"][1], by_rank
    for r in by_rank.values():
        assert r["stepped"] and r["loaded_step"] == 1 and r["params_equal"], r
        assert r["steps_before"] == r["steps_after_load"] == [1.0], r


@pytest.mark.parametrize("entry", entries_for("test_platform_adam"))
def test_platform_adam(probes: ProbeRunner, entry: str):
    """Fused Adam (SB_ADAM_IMPL=fused; CPU has torch's fused kernel too) == the stock loop."""
    stock = probes.get("fused_optim", without=entry).result
    r = probes.get("fused_optim").result
    # Stock: torch AdamW without an implementation flag (torch then picks foreach on GPUs),
    # also after a load.
    for flags in stock["flags"] + stock["flags_after_load"]:
        assert flags == {"class": "AdamW", "fused": None, "foreach": None}, stock
    fused = {"class": "AdamW[fused]", "fused": True, "foreach": False}
    assert len(r["flags"]) == len(stock["flags"]) >= 1
    assert all(f == fused for f in r["flags"] + r["flags_after_load"]), r
    # Where torch's fused kernel reads step: float32 on the parameter's device, after a load too.
    assert r["step_placement"] == r["step_placement_after_load"] == [["torch.float32", True]]
    # Three steps (weight decay, clipping, LR schedule): fused == loop to fp32 rounding.
    assert r["losses"][0] == stock["losses"][0]
    assert all(close(a, b, tol=1e-6) for a, b in zip(r["losses"], stock["losses"])), (r, stock)
    assert max(abs(a - b) for a, b in zip(r["params"], stock["params"])) < 1e-5
    assert r["params"] != stock["params"], "the fused kernel must be what ran"
    # Resume is exact with the fused kernel.
    assert r["loss_resumed"] == r["losses"][2] and r["params_equal_after_resume"]
    assert stock["loss_resumed"] == stock["losses"][2] and stock["params_equal_after_resume"]


@pytest.mark.parametrize("entry", entries_for("test_foreach_grad_norm_and_scale"))
def test_foreach_grad_norm_and_scale(probes: ProbeRunner, entry: str):
    stock = probes.get("fused_optim", without=entry).result
    r = probes.get("fused_optim").result
    n = r["num_tensors"]
    if entry == "foreach_grad_norm":
        # Stock: one norm and one host sync per tensor, plus two syncs for the total.
        assert stock["norm_ops"]["aten::linalg_vector_norm"] == n + 1, stock["norm_ops"]
        assert stock["norm_ops"]["host_syncs"] == n + 2, stock["norm_ops"]
        # Foreach: one norm over the list, one reduction; the only sync is megatron's .item()
        # of the all-reduced total (get_grad_norm_fp32 returns a float).
        assert r["norm_ops"]["aten::_foreach_norm"] == 1, r["norm_ops"]
        assert r["norm_ops"]["aten::linalg_vector_norm"] == 1, r["norm_ops"]
        assert r["norm_ops"]["host_syncs"] == 1, r["norm_ops"]
        assert r["grad_norm"] == stock["grad_norm"]  # the same per-tensor math on CPU
    else:
        # Stock: a Python loop, mul + copy per tensor (clipping, and fp32 -> bf16 copies).
        for ops in (stock["clip_ops"], stock["copy_ops"]):
            assert ops["aten::mul"] == n and ops["aten::copy_"] == n, ops
        assert r["clip_ops"]["aten::_foreach_mul_"] == 1, r["clip_ops"]
        assert r["copy_ops"]["aten::_foreach_copy_"] == 1, r["copy_ops"]
        for ops in (r["clip_ops"], r["copy_ops"]):
            assert ops["aten::mul"] == 0 and ops["aten::copy_"] == 0, ops
            assert ops["host_syncs"] == 0, ops
    assert close(r["grad_norm"], r["reference_norm"], tol=1e-6)
    assert 0 < r["clip_coeff"] < 1  # the clip really scales
    # Clipped grads == g * coeff and bf16 copies == .to(bf16), bit for bit, both ways.
    assert r["clip_exact"] and r["copy_exact"] and stock["clip_exact"] and stock["copy_exact"]


@pytest.mark.parametrize("entry", entries_for("test_grad_accum_fusion"))
def test_grad_accum_fusion(probes: ProbeRunner, entry: str):
    """Column/RowParallelLinear with the fusion == without: forward and every gradient; whole
    tiny GPTs (dense; MoE with the chunked loss and grouped experts fusing too) under DDP."""
    assert_needed(probes, "wgrad_fusion", entry)
    r = probes.get("wgrad_fusion").result
    for dtype in ("fp32", "bf16"):
        c = r[dtype]
        assert c["forward_equal"] and c["input_grad_equal"], (dtype, c)
        # The fused layers wrote main_grad themselves (DDP's hook skips their dummy wgrad).
        assert c["fused_added_to_main_grad"] == [True, True]
        assert c["plain_added_to_main_grad"] == [False, False]
        assert c["main_grad_rel_err"]["column.bias"] == c["main_grad_rel_err"]["row.bias"] == 0
    assert all(err < 1e-6 for err in r["fp32"]["main_grad_rel_err"].values()), r["fp32"]
    # bf16: the fused weight gradient is the fp32 sum of exact bf16 products; the stock one is
    # rounded to bf16 before it is added. Against fp64, fused is ~1e-7, stock ~1e-3.
    for name, err in r["bf16_vs_fp64"].items():
        assert err["fused"] < 1e-6 and err["plain"] > 1e-4 and err["fused"] < err["plain"], (
            name, err)
    # Whole tiny GPT under megatron DDP, two micro-batches: same loss and main grads, also with
    # the embedding tied to the output layer (its main_grad gets both layers' gradients).
    for gpt in (r["gpt"], r["gpt_tied"]):
        assert gpt["fused_params"] >= 8 and gpt["plain_fused_params"] == 0, gpt
        assert gpt["loss_equal"] and gpt["grads_nonzero"] and gpt["num_grads"] > 10, gpt
        assert gpt["main_grad_rel_err"] < 1e-6, gpt
    assert r["gpt_tied"]["num_grads"] == r["gpt"]["num_grads"] - 1  # one weight fewer
    # MoE GPT whose loss is the trainer's chunked output step and whose experts run the grouped
    # autograd function (ops.main_grad): the same main grads with our ops fusing too, the
    # output (or tied embedding) weight and every expert weight among the fused, and the
    # experts' main grads one region of DDP's real buffer (reversed, fc1/fc2 interleaved)
    for name, output in (("moe_chunked", "output_layer.weight"),
                         ("moe_chunked_tied", "embedding.word_embeddings.weight")):
        moe = r[name]
        assert moe["loss_equal"] and moe["main_grad_rel_err"] < 1e-6, moe
        assert moe["grads_nonzero"] == moe["num_grads"] > 10 and moe["plain_fused"] == [], moe
        experts = [n for n in moe["fused"] if ".local_experts." in n]
        assert len(experts) == 2 * moe["experts"] and output in moe["fused"] and moe["output_fused"], moe
        assert moe["region_step"] == -moe["expert_numel"], moe


# --------------------------------------------------------------------------- sbtrain's guards


def test_unshare_adam_step_guard(probes: ProbeRunner):
    """Upstream bug (checkpoint.unshare_adam_step): load_state_dict shares one Adam step."""
    r = probes.get("checkpoint").result
    n = r["num_adam_states"]
    assert n >= 2
    # Freshly loaded: one step tensor for every parameter ...
    assert r["distinct_step_tensors_after_load"] == 1
    # ... which torch Adam increments once per parameter: one step reads 1 + n, not 2.
    assert r["steps_after_one_step_unguarded"] == [1.0 + n]
    # The guard clones them (and is idempotent) ...
    assert r["unshared"] == n - 1 > 0
    assert r["unshared_again"] == 0
    assert r["distinct_step_tensors_after_unshare"] == n
    # ... after which every parameter's step advances by exactly one per optimizer step.
    assert r["steps_after_one_step"] == [2.0] * n
    assert r["steps_after_two_steps"] == [3.0] * n


def test_materialize_optimizer_state_guard(probes: ProbeRunner):
    """Upstream: a fresh optimizer's load state dict cannot be built without a zero state."""
    r = probes.get("checkpoint").result
    error = r["fresh_state_dict_error"]
    assert error.startswith("AssertionError"), error
    assert "optimizer/distrib_optimizer.py" in error and "assert len(steps) == 1" in error
    assert r["loaded_step"] == 1  # load_checkpoint, which materializes first, works


@pytest.mark.parametrize("entry", entries_for("test_moe_ep1_counts_on_device"))
def test_moe_ep1_counts_on_device(probes: ProbeRunner, entry: str):
    """Stock EP1 copies the counts and split sizes to the host and splits by host sizes;
    with the entry neither happens, and the loss and every gradient are bit-identical."""
    stock = probes.get("moe_ep1", without=entry).result
    r = probes.get("moe_ep1").result
    assert stock["dtoh_copies"] >= 2 and stock["moe_utils_tolist"] >= 2, stock
    assert r["dtoh_copies"] == 0 and r["moe_utils_tolist"] == 0, r
    assert r["loss"] == stock["loss"]
    assert r["grad_sums"] == stock["grad_sums"] and len(r["grad_sums"]) > 10
    assert any("local_experts" in n and v != 0 for n, v in r["grad_sums"].items())

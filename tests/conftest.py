"""Suite-wide settings: CPU runs never compile (megatron wraps fusions in torch.compile)."""

import json
import os

import pytest

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("SB_PLATFORM", "cpu")
# GPU tests run every autotuned Triton kernel with one pinned config (ops/autotune_pin.py): no test
# autotunes, and the processes tests launch inherit it
os.environ.setdefault("SB_TRITON_PIN", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA/MACA GPU (run with -m gpu)")
    config.addinivalue_line("markers", "multigpu: needs 2 or more CUDA/MACA GPUs (run with -m multigpu)")


def pytest_collection_modifyitems(config, items):
    import pytest
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skips = {"gpu": (gpus < 1, "needs a CUDA/MACA GPU"), "multigpu": (gpus < 2, f"needs 2+ GPUs, found {gpus}")}
    for marker, (missing, reason) in skips.items():
        if not missing:
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


# The parity runs of tests/parallel/plan.py, trained once per test session: one launch per
# world size (a launch costs seconds of imports per rank, a tiny run about one second).
@pytest.fixture(scope="session")
def planned(tmp_path_factory):
    """``planned(ranks)``: ``{run name: metrics}`` of every planned run on that many ranks."""
    from tests.parallel.harness import run_many  # the harness imports yaml: only for launches
    from tests.parallel.plan import LAUNCH_AFTER, plan, with_launch_dirs

    groups = plan()
    cache: dict[int, dict[str, list[dict]]] = {}
    directories: dict[int, object] = {}

    def curves(nproc: int) -> dict[str, list[dict]]:
        if nproc not in cache:
            for earlier in LAUNCH_AFTER.get(nproc, ()):
                curves(earlier)  # its checkpoints are read by this launch
            directories[nproc] = tmp_path_factory.mktemp(f"planned{nproc}")
            cache[nproc] = run_many(directories[nproc], nproc,
                                    with_launch_dirs(groups[nproc], directories))
        return cache[nproc]

    return curves


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A one-rank gloo default group for the module's tests (kept if one already exists)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def eager_flex(monkeypatch):
    """flex_attention run eagerly on CPU with autograd, for one test (tests/flex_eager.py)."""
    from tests.flex_eager import eager_switches, flex_module

    fa = flex_module()
    for name, value in eager_switches().items():
        monkeypatch.setattr(fa, name, value)
    return fa.flex_attention


@pytest.fixture(scope="session")
def spawn_pool(tmp_path_factory):
    """Op-level multi-rank cases of several test modules, one spawn per world size."""
    from tests.parallel.ranks import SpawnPool

    return SpawnPool(tmp_path_factory.mktemp)


# Single-process reference curves, trained once per test session and shared by every module
# that compares a layout (or a resumed / guarded run) against the same config: a planned one
# comes from the one-rank planned launch.
@pytest.fixture(scope="session")
def one_process_curve(tmp_path_factory, planned):
    """``one_process_curve(overrides)``: the metrics of a one-rank run of the tiny config."""
    from tests.parallel.harness import run
    from tests.parallel.plan import plan

    by_key = {json.dumps(o, sort_keys=True): name for name, o in plan()[1].items()}
    cache: dict[str, list[dict]] = {}

    def curve(overrides: dict) -> list[dict]:
        key = json.dumps(overrides, sort_keys=True)
        if key in by_key:
            return planned(1)[by_key[key]]
        if key not in cache:
            cache[key] = run(tmp_path_factory.mktemp("one_process"), "one", 1, overrides)
        return cache[key]

    return curve


@pytest.fixture
def cuda_platform(monkeypatch):
    """In-process GPU tests: the platform is the GPU, not the suite's ``SB_PLATFORM=cpu`` default
    (under it, tensors the model makes on the platform's device land on the CPU beside CUDA
    weights). Megatron's gradient-accumulation fusion stays off: it writes weight gradients into
    ``main_grad``, which only the DDP wrapper of a training run provides."""
    import sbtrain.model.megatron_config as megatron_config
    from maca_compat.platform import get_platform

    monkeypatch.setenv("SB_PLATFORM", "cuda")
    monkeypatch.setattr(megatron_config, "grad_accum_fusion_enabled", lambda platform: False)
    get_platform.cache_clear()
    yield get_platform()
    get_platform.cache_clear()

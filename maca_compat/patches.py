"""The one reviewed list of run-time shims of megatron-core.

Nothing here runs on import. ``apply_patches(names)`` applies entries and ``revert_patches()``
undoes them; ``maca_compat.setup()`` picks the entries a platform needs. Every entry names
its reason and the test in ``tests/maca_compat/test_patches.py`` that fails without it (each
test first shows the stock failure with the entry reverted, then success with it applied; for
the entries that exist for speed, the stock behaviour they replace, then equal numbers).
No installed file is edited and no megatron-core code is copied: entries rebind names.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from collections.abc import Callable
from typing import Any

import torch

from maca_compat.cpu_shims import (
    CPU_TORCH,
    cpu_tensor_cuda_is_identity,
    cpu_tensors_report_cuda_types,
)
from maca_compat.distopt_fixes import empty_shard_step
from maca_compat.fused_optim import WGRAD_ACCUM, foreach_l2_norm, foreach_scale, pinned_adam

logger = logging.getLogger("sbtrain.maca_compat")
_MC = "megatron.core."
CPU = ("cpu",)
ALL = ("cpu", "cuda", "maca")
MEGATRON_CORE_VERSION = "0.19.2"


@dataclasses.dataclass(frozen=True)
class Patch:
    """One shim: which names it rebinds, why, and which platforms need it."""

    name: str
    reason: str
    platforms: tuple[str, ...]
    apply: Callable[[], list[tuple[Any, str, Any]]]
    """Performs the rebinding; returns (owner, attribute, original) triples for revert."""
    test: str
    """The test that shows the stock failure without this entry."""


def _rebind_torch(*module_names: str) -> Callable[[], list]:
    """Give each module the CPU stand-in for ``torch`` (see cpu_shims.CpuTorch)."""

    def apply() -> list:
        undo = []
        for name in module_names:
            module = importlib.import_module(name)
            undo.append((module, "torch", module.torch))
            module.torch = CPU_TORCH
        return undo

    return apply


def _replace(module_name: str, attr: str, make: Callable[[Any], Any]) -> Callable[[], list]:
    """Rebind ``module.attr`` to ``make(original)``; ``attr`` may be ``Class.method``."""

    def apply() -> list:
        owner: Any = importlib.import_module(module_name)
        *path, leaf = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = owner.__dict__[leaf] if isinstance(owner, type) else getattr(owner, leaf)
        setattr(owner, leaf, make(original))
        return [(owner, leaf, original)]

    return apply


def _with_cuda_type_names(original: Any) -> Any:
    """Run ``original`` while CPU tensors report CUDA type names (see cpu_shims)."""
    func = original.__func__ if isinstance(original, (staticmethod, classmethod)) else original

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with cpu_tensors_report_cuda_types():
            return func(*args, **kwargs)

    return type(original)(wrapper) if isinstance(original, (staticmethod, classmethod)) else wrapper


def _silence_cpu_rng_warning() -> list:
    """Forking the tracker on CPU swaps the CPU generator itself, so megatron's warning that the
    CPU RNG changed inside a fork is expected there and only noise."""
    log = logging.getLogger(_MC + "tensor_parallel.random")
    undo = [(log, "filters", list(log.filters))]
    log.addFilter(lambda record: "CPU RNG state changed" not in record.getMessage())
    return undo


class _MissingIsNone(dict):
    def __missing__(self, key: str) -> None:
        return None


def _tolerate_missing_step(original: Any) -> Any:
    # Stock code indexes the loaded tensors with every key of the live torch-Adam state,
    # which includes "step"; the fully_reshardable format does not store it per parameter.
    @functools.wraps(original)
    def wrapper(self: Any, model_param: Any, tensors: dict) -> Any:
        return original(self, model_param, _MissingIsNone(tensors))

    return wrapper


def _splits_as_numpy(original: Any) -> Any:
    # Stock code turns the all-to-all split sizes into numpy only when they were on a GPU;
    # gloo's all_to_all_single rejects tensors as split sizes (TypeError).
    @functools.wraps(original)
    def move(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    return move


def _with_cpu_cuda_identity(original: Any) -> Any:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with cpu_tensor_cuda_is_identity():
            return original(*args, **kwargs)

    return wrapper


def _cpu_rng_get(original: Any) -> Any:
    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
        return torch.get_rng_state()

    return get_state


def _cpu_rng_set(original: Any) -> Any:
    # Stock code defers the set through torch.cuda._lazy_call, which on a CPU build queues it
    # forever: the state would silently never be restored.
    def set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    return set_state


MISSING = object()
"""Recorded as the original of a name an entry adds; revert_patches deletes the name again."""


def _add_global(module_name: str, attr: str, value: Any) -> Callable[[], list]:
    """Bind a module global that stock code references but only defines when Apex is present."""

    def apply() -> list:
        module = importlib.import_module(module_name)
        original = getattr(module, attr, MISSING)
        setattr(module, attr, value)
        return [(module, attr, original)]

    return apply


class _TorchWithPinnedAdam:
    """``torch`` as megatron.core.optimizer sees it: ``torch.optim.Adam``/``AdamW`` run one
    implementation (see fused_optim.pinned_adam); every other name is the real torch's."""

    def __init__(self, impl: str) -> None:
        self.optim = _OptimWithPinnedAdam(impl)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class _OptimWithPinnedAdam:
    def __init__(self, impl: str) -> None:
        self.Adam = pinned_adam(torch.optim.Adam, impl)
        self.AdamW = pinned_adam(torch.optim.AdamW, impl)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.optim, name)


def _pin_adam_impl() -> list:
    # Without Apex/TE, megatron builds torch.optim.AdamW(...) with no fused/foreach flag, so
    # torch runs its multi-kernel foreach path on GPUs; the platform picks the implementation.
    # deferred: maca_compat.platform imports this module (applied_patches)
    from maca_compat.platform import adam_impl_for, get_platform

    platform = get_platform()
    impl = adam_impl_for(platform)
    module = importlib.import_module(_MC + "optimizer")
    undo = [(module, "torch", module.torch)]
    module.torch = _TorchWithPinnedAdam(impl)
    logger.info("optimizer: torch Adam/AdamW, %s implementation (platform %s)", impl,
                platform.vendor)
    return undo


def _ep1_counts_on_device(original: Any) -> Any:
    """MoEAlltoAllTokenDispatcher.preprocess: with no expert/tensor parallelism and no token
    dropping, skip the device-to-host copy of the counts and the host sync waiting for it."""

    @functools.wraps(original)
    def preprocess(self, routing_map):
        # preprocess asserts dtoh point <= sync point; give it back the point set in __init__.
        self.cuda_dtoh_point = self.__dict__.setdefault("_sb_dtoh_point", self.cuda_dtoh_point)
        result = original(self, routing_map)
        c = self.config
        if (self.ep_size * self.tp_size == 1 and not self.drop_and_pad
                and c.moe_expert_capacity_factor is None
                and not c.moe_router_padding_for_quantization):
            # "no_sync" matches no point: counts and split sizes stay on the device.
            self.cuda_dtoh_point = self.cuda_sync_point = "no_sync"
        return result

    return preprocess


def _skip_identity_sort(original: Any) -> Any:
    """token_dispatcher.sort_chunks_by_idxs: an identity order (EP1·TP1) returns the input
    unchanged instead of splitting by sizes read on the host (``split_sizes.tolist()``)."""

    @functools.wraps(original)
    def sort_chunks_by_idxs(input, split_sizes, sorted_idxs, probs=None, fused=False):
        # sorted_idxs lives on the host unless fused (permute_idx_device), so no sync here.
        if not fused and sorted_idxs.device.type == "cpu" and torch.equal(
                sorted_idxs, torch.arange(sorted_idxs.numel(), dtype=sorted_idxs.dtype)):
            return input, probs
        return original(input, split_sizes, sorted_idxs, probs=probs, fused=fused)

    return sort_chunks_by_idxs


def _buffer_layout_world_state(original: Any) -> Any:
    """DistributedOptimizer.sharded_param_state_fully_reshardable with the gathered state laid
    out like the gradient buffer: get_parameter_state_dp_zero concatenates the buckets without
    their end padding, while this function slices that state at ``param_index_map``'s offsets,
    which count the padding. With one bucket both agree; with several (overlapped reduction)
    every parameter after the first bucket was saved with another parameter's state."""

    @functools.wraps(original)
    def sharded_param_state_fully_reshardable(self, *args, **kwargs):
        gather = self.get_parameter_state_dp_zero

        def gather_in_buffer_layout(*a, **kw):
            return _pad_world_state(self.buffers, gather(*a, **kw))

        self.get_parameter_state_dp_zero = gather_in_buffer_layout  # this call only
        try:
            return original(self, *args, **kwargs)
        finally:
            del self.get_parameter_state_dp_zero

    return sharded_param_state_fully_reshardable


def _pad_world_state(buffers, state: dict | None) -> dict | None:
    """Each bucket's slice of the unpadded world tensors moved to the bucket's buffer offset."""
    if state is None:
        return None
    for gbuf_idx, buffer in enumerate(buffers):
        for world in state[gbuf_idx].values():
            for key, tensor in list(world.items()):
                if not isinstance(tensor, torch.Tensor):
                    continue  # numel_unpadded
                padded = tensor.new_zeros(buffer.numel)
                start = 0
                for bucket in buffer.buckets:
                    n = bucket.numel_unpadded
                    padded[bucket.offset:bucket.offset + n] = tensor[start:start + n]
                    start += n
                world[key] = padded
    return state


PATCHES: tuple[Patch, ...] = (
    Patch(
        name="rng_tracker",
        reason="CudaRNGStatesTracker reads/sets the CUDA RNG (AssertionError: Torch not compiled "
        "with CUDA enabled); on CPU the tracked generator is the CPU default generator.",
        platforms=CPU,
        apply=lambda: (
            _rebind_torch(_MC + "tensor_parallel.random")()
            + _replace(_MC + "tensor_parallel.random", "_get_cuda_rng_state", _cpu_rng_get)()
            + _replace(_MC + "tensor_parallel.random", "_set_cuda_rng_state", _cpu_rng_set)()
            + _silence_cpu_rng_warning()
        ),
        test="test_rng_tracker",
    ),
    Patch(
        name="model_device_allocations",
        reason="Model code allocates with torch.cuda.current_device() / device='cuda' (RoPE, "
        "global memory buffer, TP mappings and layers, attention masks, MoE router).",
        platforms=CPU,
        apply=_rebind_torch(
            _MC + "models.common.embeddings.rotary_pos_embedding",
            _MC + "utils",
            _MC + "tensor_parallel.mappings",
            _MC + "tensor_parallel.layers",
            _MC + "transformer.utils",
            _MC + "transformer.dot_product_attention",
            _MC + "transformer.moe.router",
            _MC + "transformer.moe.moe_utils",
        ),
        test="test_model_device_allocations",
    ),
    Patch(
        name="moe_alltoall_dispatcher",
        reason="MoEAlltoAllTokenDispatcher creates a torch.cuda.Stream for its device-to-host "
        "copy of the split sizes, and passes them to all_to_all_single as tensors (gloo "
        "needs lists/arrays: TypeError: all_to_all_single(): incompatible function arguments).",
        platforms=CPU,
        apply=lambda: (
            _rebind_torch(_MC + "transformer.moe.token_dispatcher")()
            + _replace(_MC + "transformer.moe.token_dispatcher", "maybe_move_tensor_to_cpu",
                       _splits_as_numpy)()
        ),
        test="test_moe_alltoall_dispatcher",
    ),
    Patch(
        name="pipeline_schedules",
        reason="Schedules allocate the token counter with device='cuda'; p2p calls "
        "torch.cuda.synchronize() and allocates shape buffers on the current CUDA device.",
        platforms=CPU,
        apply=_rebind_torch(
            _MC + "pipeline_parallel.schedules", _MC + "pipeline_parallel.p2p_communication"
        ),
        test="test_pipeline_schedules",
    ),
    Patch(
        name="ddp_and_optimizer_devices",
        reason="DDP buffers, grad-norm and clipping allocate on CUDA and use CUDA streams.",
        platforms=CPU,
        apply=_rebind_torch(
            _MC + "distributed.param_and_grad_buffer",
            _MC + "distributed.distributed_data_parallel",
            _MC + "optimizer.optimizer",
            _MC + "optimizer.distrib_optimizer",
            _MC + "optimizer.clip_grads",
        ),
        test="test_ddp_and_optimizer",
    ),
    Patch(
        name="optimizer_cuda_type_checks",
        reason="The optimizers accept only tensors whose type() is torch.cuda.*Tensor "
        "(TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor...; "
        "assert param.grad.type() == 'torch.cuda.FloatTensor' in clipping).",
        platforms=CPU,
        apply=lambda: (
            _replace(_MC + "optimizer.distrib_optimizer",
                     "DistributedOptimizer._build_model_and_main_param_groups",
                     _with_cuda_type_names)()
            + _replace(_MC + "optimizer.optimizer",
                       "Float16OptimizerWithFloat16Params.__init__", _with_cuda_type_names)()
            # optimizer.py calls its own imported name, so that is the binding to wrap.
            + _replace(_MC + "optimizer.optimizer", "clip_grad_by_total_norm_fp32",
                       _with_cuda_type_names)()
        ),
        test="test_ddp_and_optimizer",
    ),
    Patch(
        name="dist_checkpointing_devices",
        reason="dist_checkpointing synchronizes CUDA and gathers through CUDA tensors.",
        platforms=CPU,
        apply=_rebind_torch(
            _MC + "dist_checkpointing.strategies.filesystem_async",
            _MC + "dist_checkpointing.strategies.fully_parallel",
            _MC + "dist_checkpointing.strategies.async_utils",
            _MC + "dist_checkpointing.exchange_utils",
            _MC + "dist_checkpointing.tensor_aware_state_dict",
            _MC + "dist_checkpointing.strategies.state_dict_saver",
        ),
        test="test_dist_checkpointing",
    ),
    Patch(
        name="distopt_state_gather_on_cpu",
        reason="Saving the fully_reshardable optimizer state gathers it over the DP group "
        "after send_tensor.cuda() (AssertionError: Torch not compiled with CUDA enabled).",
        platforms=CPU,
        apply=_replace(_MC + "optimizer.distrib_optimizer",
                       "DistributedOptimizer.get_parameter_state_dp_zero",
                       _with_cpu_cuda_identity),
        test="test_dist_checkpointing",
    ),
    Patch(
        name="distopt_load_missing_step",
        reason="Upstream bug without Apex/TE: loading a fully_reshardable optimizer state "
        "raises KeyError: 'step' in DistributedOptimizer._set_main_param_and_optimizer_states.",
        platforms=ALL,
        apply=_replace(_MC + "optimizer.distrib_optimizer",
                       "DistributedOptimizer._set_main_param_and_optimizer_states",
                       _tolerate_missing_step),
        test="test_distopt_load_missing_step",
    ),
    Patch(
        name="distopt_bucketed_state_save",
        reason="Upstream bug: with more than one DDP bucket (parallel.overlap_grad_reduce) the "
        "fully_reshardable optimizer save slices the bucket-unpadded gathered state at padded "
        "offsets; every parameter after the first bucket is saved with shifted main params "
        "and Adam moments (silently; a resume continues on another curve).",
        platforms=ALL,
        apply=_replace(_MC + "optimizer.distrib_optimizer",
                       "DistributedOptimizer.sharded_param_state_fully_reshardable",
                       _buffer_layout_world_state),
        test="test_distopt_bucketed_state_save",
    ),
    Patch(
        name="distopt_empty_shard_step",
        reason="Upstream bug (no Apex/TE): a rank whose expert optimizer holds no parameters "
        "(a pipeline stage without MoE layers: megatron aligns param groups across ranks) "
        "fails every save and load (DistributedOptimizer.state_dict: assert len(steps) == 1); "
        "its common state, kept from rank 0, must carry the run's step (distopt_fixes.py).",
        platforms=ALL,
        apply=_replace(_MC + "optimizer.optimizer", "ChainedOptimizer.sharded_state_dict",
                       empty_shard_step),
        test="test_distopt_empty_shard_step",
    ),
    Patch(
        name="platform_adam",
        reason="Without Apex/TE megatron builds torch.optim.AdamW with no fused/foreach flag: "
        "torch's multi-kernel foreach path on GPUs. The platform picks fused (CUDA), foreach "
        "(MACA) or the per-tensor loop (CPU), kept through load_state_dict.",
        platforms=ALL,
        apply=_pin_adam_impl,
        test="test_platform_adam",
    ),
    Patch(
        name="foreach_grad_norm",
        reason="megatron's local_multi_tensor_l2_norm (no Apex/TE) runs one norm kernel and "
        "one host sync per gradient tensor; foreach_l2_norm: one foreach norm, no sync.",
        platforms=ALL,
        apply=_replace(_MC + "optimizer.clip_grads", "l2_norm_impl",
                       lambda original: foreach_l2_norm),
        test="test_foreach_grad_norm_and_scale",
    ),
    Patch(
        name="foreach_multi_tensor_scale",
        reason="megatron's local_multi_tensor_scale (no Apex/TE) scales/copies tensor lists "
        "in a Python loop, two kernels per tensor (gradient clipping, main->model params).",
        platforms=ALL,
        apply=lambda: (
            _replace(_MC + "optimizer.clip_grads", "multi_tensor_scale_impl",
                     lambda original: foreach_scale)()
            + _replace(_MC + "optimizer.optimizer", "multi_tensor_scale_impl",
                       lambda original: foreach_scale)()
        ),
        test="test_foreach_grad_norm_and_scale",
    ),
    Patch(
        name="grad_accum_fusion",
        reason="gradient_accumulation_fusion needs Apex's fused_weight_gradient_mlp_cuda "
        "(RuntimeError in ColumnParallelLinear.__init__ without it); fused_optim.WGRAD_ACCUM "
        "accumulates the weight gradient GEMM straight into the fp32 main_grad in torch. "
        "Whether a run enables it is the platform's choice (platform.grad_accum_fusion_for).",
        platforms=ALL,
        apply=lambda: (
            _replace(_MC + "tensor_parallel.layers", "_grad_accum_fusion_available",
                     lambda original: True)()
            + _add_global(_MC + "tensor_parallel.layers", "fused_weight_gradient_mlp_cuda",
                          WGRAD_ACCUM)()
        ),
        test="test_grad_accum_fusion",
    ),
    Patch(
        name="moe_ep1_counts_on_device",
        reason="Speed: at EP1·TP1 the alltoall dispatcher still copies tokens_per_expert to "
        "the host and waits for it (token_dispatcher.py:948-950, before_permutation_2) to "
        "sort chunks whose order is the identity (moe_utils.py:607 split_sizes.tolist()). "
        "Skipping both keeps the counts on the device; GroupedExperts then needs no sync.",
        platforms=ALL,
        apply=lambda: (
            _replace(_MC + "transformer.moe.token_dispatcher",
                     "MoEAlltoAllTokenDispatcher.preprocess", _ep1_counts_on_device)()
            + _replace(_MC + "transformer.moe.token_dispatcher", "sort_chunks_by_idxs",
                       _skip_identity_sort)()
        ),
        test="test_moe_ep1_counts_on_device",
    ),
)

_applied: list[tuple[str, list[tuple[Any, str, Any]]]] = []


def patches_for(platform_vendor: str) -> list[Patch]:
    return [p for p in PATCHES if platform_vendor in p.platforms]


def apply_patches(names: list[str] | None = None, vendor: str = "cpu") -> list[str]:
    """Apply the named entries (default: all for ``vendor``); already-applied ones are skipped."""
    done = {name for name, _ in _applied}
    chosen = [p for p in patches_for(vendor) if names is None or p.name in names]
    for patch in chosen:
        if patch.name in done:
            continue
        _applied.append((patch.name, patch.apply()))
        logger.debug("applied megatron-core shim %s: %s", patch.name, patch.reason)
    return [p.name for p in chosen]


def revert_patches(names: list[str] | None = None) -> None:
    """Undo applied entries (all by default), newest first."""
    for name, undo in reversed(list(_applied)):
        if names is not None and name not in names:
            continue
        for owner, attr, original in reversed(undo):
            if original is MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)
        _applied.remove((name, undo))


def applied_patches() -> list[str]:
    return [name for name, _ in _applied]

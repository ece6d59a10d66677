"""Spiking activations in the model: the adaptive-threshold neuron on linear-layer inputs.

With the YAML's ``spiking.enabled``, every Column/RowParallelLinear built from a layer spec
(attention q/k/v and o in every mixer, the FFN and expert projections) first turns its input
into ``V_th * round(x / V_th)`` with ``V_th = mean|x| / k`` per token (``ops.spike``,
straight-through gradient); the GLA gate projection and sliding-window queries get the same
neuron in their modules. Embeddings, the LM head, the router, norms and the recurrences stay
untouched, as in SpikingBrain's W8ASpike.

A RowParallelLinear under tensor parallelism sees only its slice of each token's features,
so its threshold sums |x| over the TP group first: the spikes are those of the whole row, the
same under any TP size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import torch
import torch.distributed as dist

from ops.spike import spike_activation, spike_counts
from sbtrain.spiking.stats import CountHistogram


class FiringRecorder:
    """Sums spike statistics over every neuron call while active (see :func:`recording`).

    With ``by_site`` it also keeps an exact histogram of the counts per *site*, the module
    whose forward called the neuron (named by :func:`attribute_sites`). The sums are the
    same either way, so the training log's numbers do not depend on the mode.
    """

    def __init__(self, by_site: bool = False) -> None:
        self.elements = 0.0
        self.sites: dict | None = {} if by_site else None
        """Site name -> ``sbtrain.spiking.stats.CountHistogram`` (``by_site`` only)."""
        self._stack: list[str] = []
        self._sums: torch.Tensor | None = None
        """[sum of |count|, firing elements] in float64 on the counts' device: no host read per
        neuron call (each one waited for the device); added in call order, as floats were."""

    def add(self, counts: torch.Tensor) -> None:
        if self.sites is not None:
            self._add_to_site(counts)
        counts = counts.detach().float()
        sums = torch.stack([counts.abs().sum().double(), (counts != 0).sum().double()])
        self._sums = sums if self._sums is None else self._sums + sums
        self.elements += counts.numel()

    def totals(self, device: torch.device) -> torch.Tensor:
        """[sum of |count|, firing elements, elements] as one float64 tensor on ``device``."""
        sums = self._sums.to(device) if self._sums is not None else torch.zeros(
            2, dtype=torch.float64, device=device)
        return torch.cat([sums, sums.new_tensor([self.elements])])

    @property
    def abs_counts(self) -> float:
        return 0.0 if self._sums is None else float(self._sums[0])

    @property
    def firing(self) -> float:
        return 0.0 if self._sums is None else float(self._sums[1])

    def _add_to_site(self, counts: torch.Tensor) -> None:
        site = self._stack[-1] if self._stack else UNATTRIBUTED
        self.sites.setdefault(site, CountHistogram()).add(counts)

    def enter(self, site: str) -> None:
        """Neuron calls from now on belong to ``site`` (until the matching :meth:`leave`)."""
        self._stack.append(site)

    def leave(self) -> None:
        self._stack.pop()


UNATTRIBUTED = "<unattributed>"
"""Site of neuron calls made outside every module :func:`attribute_sites` hooked."""

_RECORDER: FiringRecorder | None = None


@contextlib.contextmanager
def recording(by_site: bool = False):
    """Record spike counts of every neuron call inside the block (costs one extra pass)."""
    global _RECORDER
    _RECORDER = FiringRecorder(by_site)
    try:
        yield _RECORDER
    finally:
        _RECORDER = None


def is_spiking_linear(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a parallel linear layer made spiking by :func:`spiking_linear`."""
    return isinstance(module, _SpikingInput)


def neuron_sites(model: torch.nn.Module) -> dict[torch.nn.Module, str]:
    """Every module that calls the neuron in its forward, with its site name.

    Spiking linears are named as modules (``decoder.layers.0.mlp.linear_fc1``); a module that
    calls the neuron itself declares where in ``neuron_sites()`` (a GLA mixer spikes its gate's
    input, ``<mixer>.gate_down``; a sliding-window core attention or parallel-hybrid mixer its
    queries, ``<module>.query``). Forward hooks attribute per module, so one module declares
    at most one site.
    """
    sites = {}
    for name, module in model.named_modules():
        if is_spiking_linear(module):
            sites[module] = name
            continue
        declared = list(declared_sites(module))
        if len(declared) > 1:
            raise ValueError(f"{name} declares neuron sites {declared}; the firing recorder "
                             f"attributes spikes per module, so one module may declare one")
        if declared:
            sites[module] = f"{name}.{declared[0]}"
    return sites


def declared_sites(module: torch.nn.Module) -> dict[str, torch.nn.Module | None]:
    """A module's own neuron sites (site -> the projection the spikes feed, or None)."""
    declare = getattr(module, "neuron_sites", None)
    return declare() if callable(declare) else {}


@contextlib.contextmanager
def attribute_sites(model: torch.nn.Module, recorder: FiringRecorder):
    """Inside the block, ``recorder`` files each neuron call under its calling module's site.

    Forward pre-hooks push the site and forward hooks pop it, so nested sites (a GLA mixer
    calling its spiking ``linear_qkv``) resolve to the innermost module.
    """
    handles = []
    for module, site in neuron_sites(model).items():
        handles.append(module.register_forward_pre_hook(
            lambda _m, _args, site=site: recorder.enter(site)))
        handles.append(module.register_forward_hook(lambda _m, _args, _out: recorder.leave()))
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


@dataclasses.dataclass(frozen=True)
class Neuron:
    """Threshold parameters of the neuron (see ``ops.spike``)."""

    k: float = 3.0
    vth_min: float = 1e-5
    vth_max: float = 1e4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if _RECORDER is not None:
            _RECORDER.add(spike_counts(x.detach(), self.k, self.vth_min, self.vth_max)[0])
        return spike_activation(x, self.k, self.vth_min, self.vth_max)

    def sharded(self, x: torch.Tensor, group) -> torch.Tensor:
        """The neuron over rows split along the last dim across ``group`` (STE gradient)."""
        total = x.detach().abs().float().sum(-1, keepdim=True)
        dist.all_reduce(total, group=group)
        width = x.shape[-1] * dist.get_world_size(group)
        vth = (total / width / self.k).clamp(self.vth_min, self.vth_max)
        counts = torch.round(x.detach().float() / vth)
        if _RECORDER is not None:
            _RECORDER.add(counts)
        spiked = (counts * vth).to(x.dtype)
        # Straight-through: the forward value is the spiked one, the gradient is identity.
        return x + (spiked - x).detach()


class _SpikingInput:
    """Mixin: spike the input, then run the parallel linear layer unchanged."""

    neuron: Neuron

    def forward(self, input_: torch.Tensor, *args: Any, **kwargs: Any):
        group = getattr(self, "tp_group", None)
        sharded = getattr(self, "input_is_parallel", False) and group is not None \
            and dist.get_world_size(group) > 1
        spiked = self.neuron.sharded(input_, group) if sharded else self.neuron(input_)
        return super().forward(spiked, *args, **kwargs)


@functools.cache
def spiking_linear(base: type, neuron: Neuron) -> type:
    """``base`` (a Column/RowParallelLinear class) with the neuron on its input."""
    return type(f"Spiking{base.__name__}", (_SpikingInput, base), {"neuron": neuron})

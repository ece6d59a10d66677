"""The spec provider (sbtrain.model.spec_provider): which class fills each slot, and where the
spiking neuron goes, read from the specs themselves (no model built).

With the neuron on, every Column/RowParallelLinear slot of every mixer and FFN holds the
spiking class and nothing else changes; the neuron reaches exactly the sites SpikingBrain's
W8ASpike spikes (GLA's gate input, sliding-window queries in ``W`` and ``H`` layers).
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from sbtrain.config.schema import ModelConfig, MoEConfig, SpikingConfig
from sbtrain.model.experts import GroupedExperts
from sbtrain.model.spec_provider import MIXERS, build_layer_specs
from sbtrain.spiking.layers import Neuron, neuron_sites

PATTERN = "*EW-L-HEF-"   # every mixer, dense and MoE FFNs


def _slots(spec, path=""):
    """(path, value) of every leaf of a spec tree (ModuleSpecs, dataclasses, partials)."""
    if isinstance(spec, functools.partial):
        yield path, spec.func
        for key, value in spec.keywords.items():
            yield from _slots(value, f"{path}.{key}")
    elif dataclasses.is_dataclass(spec) and not isinstance(spec, (type, Neuron)):
        for field in dataclasses.fields(spec):
            yield from _slots(getattr(spec, field.name), f"{path}.{field.name}")
    elif isinstance(spec, dict):
        for key, value in spec.items():
            yield from _slots(value, f"{path}.{key}")
    else:
        yield path, spec


def _linear_slots(specs):
    return {(i, path): value for i, spec in enumerate(specs) for path, value in _slots(spec)
            if isinstance(value, type) and issubclass(value, (ColumnParallelLinear, RowParallelLinear))}


def _neurons(specs):
    return {(i, path): value for i, spec in enumerate(specs) for path, value in _slots(spec)
            if path.endswith("_neuron")}


def test_every_pattern_symbol_has_a_mixer():
    assert set(MIXERS) == {"*", "W", "L", "H", "F"}


def test_spiking_fills_every_linear_slot_and_only_those():
    model = ModelConfig(pattern=PATTERN, moe=MoEConfig(num_experts=4))
    plain = build_layer_specs(model)
    spiking = build_layer_specs(model, SpikingConfig(enabled=True, k=2.0))
    plain_linears, spiking_linears = _linear_slots(plain), _linear_slots(spiking)
    assert set(plain_linears) == set(spiking_linears)
    # q/k/v and o of each of the 5 mixers, fc1/fc2 of 3 dense MLPs, 2 MoEs x (experts + shared)
    assert len(plain_linears) == 2 * 5 + 2 * 3 + 2 * 2 * 2
    assert not any(is_spiking_linear_class(v) for v in plain_linears.values())
    for slot, cls in spiking_linears.items():
        assert is_spiking_linear_class(cls), slot
        assert issubclass(cls, plain_linears[slot]), slot
        assert cls.neuron == Neuron(k=2.0), slot
    # everything that is not a linear or a neuron is the same with and without spiking
    rest = [[(p, v) for p, v in _slots(s) if (i, p) not in plain_linears and not p.endswith("_neuron")]
            for i, s in enumerate(plain)]
    assert rest == [[(p, v) for p, v in _slots(s) if (i, p) not in plain_linears
                     and not p.endswith("_neuron")] for i, s in enumerate(spiking)]


def is_spiking_linear_class(cls: type) -> bool:
    return cls.__name__.startswith("Spiking") and hasattr(cls, "neuron")


def test_the_neuron_reaches_exactly_the_w8aspike_sites():
    model = ModelConfig(pattern=PATTERN, moe=MoEConfig(num_experts=4))
    assert not any(_neurons(build_layer_specs(model)).values())
    given = {key: n for key, n in _neurons(build_layer_specs(model, SpikingConfig(enabled=True))).items()
             if n is not None}
    assert set(given) == {
        (1, ".submodules.self_attention.submodules.core_attention.query_neuron"),   # W
        (2, ".submodules.self_attention.params.input_neuron"),                      # L
        (3, ".submodules.self_attention.params.query_neuron"),                      # H
    }
    assert set(given.values()) == {Neuron()}


def test_routed_experts_are_grouped_with_the_mlp_slots_of_the_provider():
    spec = build_layer_specs(ModelConfig(pattern="*E"), SpikingConfig(enabled=True))[0]
    experts = spec.submodules.mlp.keywords["submodules"].experts
    assert experts.func is GroupedExperts
    assert is_spiking_linear_class(experts.keywords["submodules"].linear_fc1)


class _TwoSites(torch.nn.Module):
    def neuron_sites(self):
        return {"a": None, "b": None}


def test_a_module_declares_at_most_one_neuron_site():
    with pytest.raises(ValueError, match="declares neuron sites"):
        neuron_sites(torch.nn.Sequential(_TwoSites()))


def test_unknown_mixer_names_the_layer(monkeypatch):
    monkeypatch.delitem(MIXERS, "L")
    with pytest.raises(NotImplementedError, match="layer 1: mixer 'L'"):
        build_layer_specs(ModelConfig(pattern="*-L-"))



def test_softmax_mixers_get_the_exchange_of_their_layer_kind():
    """``softmax_exchanges`` (parallel.sp_softmax_exchange resolved per kind) reaches every
    softmax mixer by its kind: ``W``/``H`` the window's, ``*``/``F`` full attention's."""
    model = ModelConfig(pattern=PATTERN, moe=MoEConfig(num_experts=4))
    specs = build_layer_specs(model, softmax_exchanges={"window": "halo", "full": "ulysses"})
    given = {(i, path): value for i, spec in enumerate(specs) for path, value in _slots(spec)
             if path.endswith("softmax_exchange")}
    # layers of "*EW-L-HEF-": * (0), W (1), L (2), H (3), F (4)
    assert sorted((i, value) for (i, _), value in given.items()) == [
        (0, "ulysses"), (1, "halo"), (3, "halo"), (4, "ulysses")]
    defaults = build_layer_specs(model)
    assert {value for path, value in _slots(defaults[4]) if path.endswith("softmax_exchange")} == {"tails"}

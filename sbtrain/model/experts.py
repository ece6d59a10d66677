"""Routed experts in one grouped GEMM per projection (Megatron's MoE ``experts`` slot).

:class:`GroupedExperts` is Megatron's :class:`SequentialMLP` with a different forward: the
parameters, their names (``local_experts.<i>.linear_fc{1,2}.weight``), the distributed
checkpoint keys, the global-expert mapping under expert parallelism, the layout-invariant
initialisation and upcycling are SequentialMLP's, unchanged, because they are inherited.
The forward runs ``ops.grouped_mlp.grouped_swiglu_mlp`` over all local experts at once and
keeps ``tokens_per_expert`` where the dispatcher put it (no ``tolist()`` host sync).

Why per-expert parameters and not one stacked ``[E, 2F, H]`` parameter: every consumer of
the parameters (Megatron's DDP buffers, the distributed optimizer's checkpoint mapping by
parameter identity, ``parallel/init.py``'s per-expert streams, upcycling's state-dict keys)
works unchanged. The price is one ``torch.stack`` copy of the local experts' weights per
forward and one in the backward (the stack is rebuilt there rather than saved, so no
weight copy lives between forward and backward); ``bench/bench_grouped_mlp.py`` measures it.

Spiking: the neuron's threshold is per token (per row), so spiking all permuted rows at
once equals spiking each expert's rows apart; fc1's input uses the experts' neuron and fc2's
input its row-parallel (TP-summed) variant, exactly as the spiking linears do. While a
firing recorder is active the per-expert path runs instead, so each expert linear's spikes
stay attributed to its own site.

Gradient-accumulation fusion: with the run's ``gradient_accumulation_fusion`` the fast grouped
backends write the experts' weight gradients straight into their DDP ``main_grad`` (one
accumulating GEMM, or one add over the buffer region holding them) instead of ``E`` bf16
gradients that DDP's hook adds one by one (``ops.grouped_mlp``, ``ops.main_grad``).

Megatron DDP's ``overlap_param_gather`` waits for a module's parameters in that module's
forward pre-hook, and the expert linears' forwards are not called here:
``uses_child_params_directly`` asks ``parallel.param_gather`` for a pre-hook on this module
that waits for all of the experts' parameters.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from ops.grouped_mlp import grouped_swiglu_mlp
from sbtrain.spiking import layers as spiking_layers


class GroupedExperts(SequentialMLP):
    """SequentialMLP's parameters and checkpoint, grouped-GEMM forward (see module doc)."""

    uses_child_params_directly = True
    """The expert linears' weights are used without their forwards (parallel.param_gather)."""

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        reason = self.per_expert_reason()
        if reason is not None:
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        experts = list(self.local_experts)
        output = grouped_swiglu_mlp(
            permuted_local_hidden_states,
            tokens_per_expert,
            [e.linear_fc1.weight for e in experts],
            [e.linear_fc2.weight for e in experts],
            probs=permuted_probs,
            activation=self._activation(),
            input_hook=self._fc1_input_hook(),
            fc2_input_hook=self._fc2_input_hook(),
            # Megatron's expert linears would fuse with this flag too (ops.main_grad)
            grad_accum_fusion=self.config.gradient_accumulation_fusion,
        )
        return output, None

    def per_expert_reason(self) -> str | None:
        """Why this call must take SequentialMLP's per-expert path, or None."""
        c = self.config
        if c.fp8 or c.fp4:
            return "fp8/fp4 need the per-expert quantisation padding"
        if c.add_bias_linear:
            return "expert biases"
        if not c.gated_linear_unit or (not c.use_te_activation_func and c.activation_func is not F.silu):
            return "the grouped path implements SwiGLU only"
        if c.moe_apply_probs_on_input or c.activation_func_clamp_value is not None \
                or c.glu_linear_offset != 0.0:
            return "probs-on-input / clamped or offset GLU variants"
        if spiking_layers._RECORDER is not None and self._neuron() is not None:
            return "a firing recorder attributes spikes per expert linear"
        return None

    def _activation(self):
        # With use_te_activation_func Megatron's MLP applies its spec's activation module to
        # the whole [.., 2F] fc1 output; all experts share that (stateless) module's class.
        if self.config.use_te_activation_func:
            return self.local_experts[0].activation_func
        return _megatron_glu

    def _neuron(self):
        fc1 = self.local_experts[0].linear_fc1
        return fc1.neuron if spiking_layers.is_spiking_linear(fc1) else None

    def _fc1_input_hook(self):
        return self._neuron()

    def _fc2_input_hook(self):
        neuron = self._neuron()
        if neuron is None:
            return None
        group = self.local_experts[0].linear_fc2.tp_group
        if group is not None and dist.get_world_size(group) > 1:
            return lambda x: neuron.sharded(x, group)
        return neuron


def _megatron_glu(x: torch.Tensor) -> torch.Tensor:
    """Megatron's unfused gated linear unit with SiLU: what its MLP computes without
    ``use_te_activation_func`` (chunk, ``activation_func``, multiply)."""
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up

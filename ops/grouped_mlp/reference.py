"""Plain-torch references of the grouped expert GEMMs: one matmul per expert, in order.

Rows of ``x`` are grouped by expert (Megatron's permuted layout): expert ``e`` owns the
``tokens_per_expert[e]`` rows after those of experts ``0..e-1``. The reference splits on
the host (``tolist``), which is fine for a reference and is exactly what the fast
backends avoid.
"""

from __future__ import annotations

import torch
from torch import Tensor


def loop_grouped_linear(x: Tensor, tokens_per_expert: Tensor, weight) -> Tensor:
    """``y[rows of e] = x[rows of e] @ weight[e].T``; ``x`` [T, K], ``weight`` [E, N, K] or a
    list of E ``[N, K]`` tensors."""
    counts = [int(c) for c in tokens_per_expert.tolist()]
    chunks = torch.split(x, counts)
    outs = [chunk @ weight[e].t() for e, chunk in enumerate(chunks)]
    return torch.cat(outs, dim=0) if outs else x.new_zeros(0, weight[0].shape[0])


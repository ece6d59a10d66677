"""Grouped GEMMs through torch's grouped matmul (CUTLASS on CUDA Hopper).

``torch._grouped_mm(a, b, offs)`` takes the groups' cumulative end rows ``offs`` (int32,
on the device), so counts never leave the GPU. Constraints (torch 2.11, checked by the
verifier in ``ops.grouped_mlp``): bf16 inputs, compute capability >= 9.0, and 16-byte
aligned strides, i.e. both GEMM widths (N and K) multiples of 8.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rows_grouped_mm(a: Tensor, offsets: Tensor, b_t: Tensor) -> Tensor:
    """``out[rows of e] = a[rows of e] @ b_t[e]``; ``a`` [T, K], ``b_t`` [E, K, N] (any strides)."""
    return torch._grouped_mm(a, b_t, offs=offsets)


def k_grouped_mm(p: Tensor, offsets: Tensor, q: Tensor) -> Tensor:
    """``out[e] = p[rows of e].T @ q[rows of e]``; ``p`` [T, N], ``q`` [T, K] -> [E, N, K].

    An expert with no rows gets a zero block.
    """
    return torch._grouped_mm(p.t(), q, offs=offsets)

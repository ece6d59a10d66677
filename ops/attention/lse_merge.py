"""LSE-merge backend of op ``attention`` for calls with sinks: the seam for a vendor kernel.

The vLLM serving algorithm (``vllm_hymeta/attention/fa_kernel_metatoken.py``): the regular
tokens' attention among themselves (flex with the sink-free block mask) and the attention of
every query to the S sinks (dense flex), each with its log-sum-exp, merged by
:func:`merge_attention`. Gradients reach the pieces through both outputs and both
log-sum-exps (flex differentiates its lse). It runs the same Triton flex kernels as ``flex``
plus an fp32 merge pass, so it ranks below it; it exists for a vendor kernel that returns the
lse (flash-attn's varlen kernel, as in vLLM), which would replace the first flex call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ops.attention.flex import BlockMaskCache, compiled_flex_attention, block_mask_of, verify_flex
from ops.attention.masks import Positions, check_inputs
from ops.backends import Check


def merge_attention(out1: Tensor, lse1: Tensor, out2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two attentions of the same queries over disjoint key sets by their log-sum-exps.

    ``out = (exp(lse1) out1 + exp(lse2) out2) / (exp(lse1) + exp(lse2))``, computed as vLLM's
    meta-token backend does, without exponentials that can overflow:
    ``out = out1 - sigmoid(lse2 - lse1) (out1 - out2)``, ``lse = lse1 - logsigmoid(lse1 - lse2)``.
    Differentiable in all four inputs. A row needs one finite lse (both -inf gives NaN).

    Args:
        out1, out2: [..., T, D] normalised attention outputs.
        lse1, lse2: [..., T] natural-log log-sum-exps of the scaled scores behind them.

    Returns:
        ``(out, lse)``: [..., T, D] in ``out1``'s dtype (merged in fp32; fp64 for fp64) and
        [..., T] in the merge's dtype.
    """
    dtype = torch.float64 if out1.dtype == torch.float64 else torch.float32
    lse1, lse2 = lse1.to(dtype), lse2.to(dtype)
    weight2 = torch.sigmoid(lse2 - lse1).unsqueeze(-1)
    a, b = out1.to(dtype), out2.to(dtype)
    out = a - weight2 * (a - b)
    return out.to(out1.dtype), lse1 - F.logsigmoid(lse1 - lse2)


def lse_merge_attention(q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None,
                        documents: Tensor | None = None, sinks: int = 0, positions: Positions | None = None,
                        scale: float | None = None, flex_fn: Callable[..., tuple[Tensor, object]] | None = None,
                        cache: BlockMaskCache | None = None) -> Tensor:
    """Op ``attention`` with sinks as regular attention + attention to the sinks, merged by lse.

    Args:
        flex_fn: the flex_attention callable; defaults to ``flex.compiled_flex_attention``.
        cache: block-mask cache of the regular part; defaults to ``flex.BLOCK_MASKS``.
    """
    from torch.nn.attention.flex_attention import AuxRequest  # deferred: flex is imported on the GPU path only

    check_inputs(q, k, v, window, documents, sinks, positions)
    if not sinks or positions is not None:
        raise ValueError("lse_merge serves calls with sinks and without positions")
    S, gqa = sinks, k.shape[1] != q.shape[1]
    regular = [t[:, :, S:] for t in (q, k, v)]
    block_mask = block_mask_of(regular[0], regular[1], window, documents, 0, None, cache)
    flex = compiled_flex_attention() if flex_fn is None else flex_fn
    lse_only = AuxRequest(lse=True)
    out_reg, aux_reg = flex(*regular, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_aux=lse_only)
    out_snk, aux_snk = flex(q, k[:, :, :S], v[:, :, :S], scale=scale, enable_gqa=gqa, return_aux=lse_only)
    out, _ = merge_attention(out_reg, aux_reg.lse, out_snk[:, :, S:], aux_snk.lse[:, :, S:])
    return torch.cat([out_snk[:, :, :S], out], dim=2)


def verify_lse_merge(q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None,
                     documents: Tensor | None = None, sinks: int = 0, positions: Positions | None = None,
                     scale: float | None = None) -> Check:
    """Accept what ``flex.verify_flex`` accepts, for calls with sinks and without positions."""
    if not sinks or positions is not None:
        return False, "lse_merge serves calls with sinks and without positions"
    return verify_flex(q, k, v, window=window, documents=documents, sinks=sinks, scale=scale)

"""Op ``attention`` on one process's tensors: the registry and its backends.

``local_attention`` dispatches per call (``ops.backends``) to the fastest backend that accepts
it; the arguments are those of :func:`ops.attention.attention` without ``sp``:

* ``sdpa`` (vendor, priority 20): torch SDPA with ``is_causal=True``, the flash kernel. CUDA
  only; plain causal calls only (no sinks, documents or positions; window None or >= L - 1).
  torch's flash SDPA kernel is a CUDA library kernel (not verified on MetaX's mcPyTorch): on
  platform maca the Triton flex backend serves these calls.
* ``flex`` (triton, priority 10): one block-sparse ``flex_attention`` (``flex.py``). CUDA only.
* ``lse_merge`` (triton, priority 5): calls with sinks as two flex calls merged by their
  log-sum-exps (``lse_merge.py``): the seam for a vendor kernel that returns an lse.
* ``torch``: :func:`ops.attention.naive.naive_attention`, the explicit mask in fp32.

``local_attention_lse`` (op ``attention_lse``, same arguments) also returns each query's
log-sum-exp and lets a query see no key (output 0, lse -inf): the parts of an attention split
over disjoint key sets, merged by ``lse_merge.merge_attention`` (sequence parallelism computes
its own slice while the earlier slices' keys are in flight). Backends: ``flex`` (its aux lse)
and the reference :func:`ops.attention.naive.naive_attention_lse`.
"""

from __future__ import annotations

from ops.attention.flex import flex_attention_backend, flex_attention_lse, flex_available, verify_flex
from ops.attention.lse_merge import lse_merge_attention, verify_lse_merge
from ops.attention.naive import naive_attention, naive_attention_lse
from ops.attention.sdpa import sdpa_attention, verify_sdpa
from ops.backends import Backend, dispatch

OP_NAME = "attention"
LSE_OP_NAME = "attention_lse"

local_attention = dispatch(OP_NAME)(naive_attention)
local_attention.registry.register(  # type: ignore[attr-defined]
    Backend(name="sdpa", fn=sdpa_attention, kind="vendor", verifier=verify_sdpa, platforms=("cuda",)))
local_attention.registry.register(  # type: ignore[attr-defined]
    Backend(name="flex", fn=flex_attention_backend, kind="triton", available=flex_available, verifier=verify_flex))
local_attention.registry.register(  # type: ignore[attr-defined]
    Backend(name="lse_merge", fn=lse_merge_attention, kind="triton", priority=5, available=flex_available,
            verifier=verify_lse_merge))

local_attention_lse = dispatch(LSE_OP_NAME)(naive_attention_lse)
local_attention_lse.registry.register(  # type: ignore[attr-defined]
    Backend(name="flex", fn=flex_attention_lse, kind="triton", available=flex_available, verifier=verify_flex))

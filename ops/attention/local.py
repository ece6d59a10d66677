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
"""

from __future__ import annotations

from ops.attention.flex import flex_attention_backend, flex_available, verify_flex
from ops.attention.lse_merge import lse_merge_attention, verify_lse_merge
from ops.attention.naive import naive_attention
from ops.attention.sdpa import sdpa_attention, verify_sdpa
from ops.backends import Backend, dispatch

OP_NAME = "attention"

local_attention = dispatch(OP_NAME)(naive_attention)
local_attention.registry.register(  # type: ignore[attr-defined]
    Backend(name="sdpa", fn=sdpa_attention, kind="vendor", verifier=verify_sdpa, platforms=("cuda",)))
local_attention.registry.register(  # type: ignore[attr-defined]
    Backend(name="flex", fn=flex_attention_backend, kind="triton", available=flex_available, verifier=verify_flex))
local_attention.registry.register(  # type: ignore[attr-defined]
    Backend(name="lse_merge", fn=lse_merge_attention, kind="triton", priority=5, available=flex_available,
            verifier=verify_lse_merge))

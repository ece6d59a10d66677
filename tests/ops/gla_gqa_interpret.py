"""Run the ``gqa_chunk`` GLA kernels (with fla's state kernels) in Triton's CPU interpreter.

Executed in a subprocess by ``test_gla_gqa.py`` with ``TRITON_INTERPRET=1`` (Triton reads it when
the kernels are decorated). Prints one JSON line: per case, the worst error of the output, the
final state and every gradient against the fp32 recurrence, relative to the reference's largest
value. Two interpreter workarounds, for this harness only:
  * autotuning benchmarks on a GPU driver, which the interpreter lacks: keep each kernel's first
    config (its smallest blocks, so K = V = 64 still runs several blocks);
  * in the interpreter a ``range`` loop variable is a Python int, and fla's kernels call
    ``.to()`` on theirs: the kernel modules get a ``range`` yielding Triton scalars.
"""

from __future__ import annotations

import builtins
import json
import sys
import time

import torch
import torch.nn.functional as F
import triton.language as tl
import triton.runtime.autotuner as autotuner

import fla.ops.common.chunk_h as fla_chunk_h
import fla.ops.utils.cumsum as fla_cumsum
import ops.gla.gqa_kernels as fwd_kernels
import ops.gla.gqa_kernels_bwd as bwd_kernels
from ops.gla import gla_recurrent_reference
from ops.gla.gqa_chunk import chunk_gla_gqa

# small: the interpreter runs every program in Python (seconds per case). T > 16 gives several
# 16-token chunks (fla's chunk size for short inputs) and sub-chunks; K or V = 64 several blocks
CASES = {
    # B, T, HQ, H, K, V, cu_seqlens, initial state
    "T40-gqa2-rows": (2, 40, 4, 2, 32, 32, None, False),
    "T24-gqa3-K64-h0": (1, 24, 3, 1, 64, 32, None, True),
    "varlen-T40-gqa2-V64-h0": (1, 40, 4, 2, 32, 64, [0, 13, 14, 40], True),
}


def _first_config_only() -> None:
    run = autotuner.Autotuner.run

    def first(self, *args, **kwargs):
        self.configs = self.configs[:1]
        return run(self, *args, **kwargs)

    autotuner.Autotuner.run = first


def _scalar_range(*args):
    def value(a):
        handle = getattr(a, "handle", None)
        return int(handle.data.reshape(-1)[0]) if handle is not None else int(a)

    for i in builtins.range(*(value(a) for a in args)):
        yield tl.full((), i, tl.int64)


def errors(B, T, HQ, H, K, V, bounds, h0) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    N = B if bounds is None else len(bounds) - 1
    leaves = {"q": torch.randn(B, T, HQ, K, generator=gen), "k": torch.randn(B, T, H, K, generator=gen),
              "v": torch.randn(B, T, H, V, generator=gen),
              "g": F.logsigmoid(torch.randn(B, T, H, K, generator=gen)) / 4}
    if h0:
        leaves["h0"] = torch.randn(N, H, K, V, generator=gen)
    do, dht = torch.randn(B, T, HQ, V, generator=gen), torch.randn(N, H, K, V, generator=gen)
    cu = None if bounds is None else torch.tensor(bounds)
    results = []
    for fn in (chunk_gla_gqa, gla_recurrent_reference):
        x = {n: t.clone().requires_grad_() for n, t in leaves.items()}
        o, ht = fn(x["q"], x["k"], x["v"], x["g"], initial_state=x.get("h0"), output_final_state=True,
                   cu_seqlens=cu)
        grads = torch.autograd.grad((o * do).sum() + (ht * dht).sum(), list(x.values()))
        results.append({"o": o, "ht": ht, **{"d" + n: gr for n, gr in zip(x, grads)}})
    got, ref = results
    return {n: ((got[n] - ref[n]).abs().max() / ref[n].abs().max()).item() for n in ref}


def main() -> None:
    _first_config_only()
    for module in (fla_chunk_h, fla_cumsum, fwd_kernels, bwd_kernels):
        module.range = _scalar_range
    results = {}
    for name, case in CASES.items():
        start = time.perf_counter()
        results[name] = errors(*case)
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

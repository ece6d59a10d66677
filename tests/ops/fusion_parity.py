"""Shared checks of the elementwise fusions (ops.swiglu, ops.rmsnorm, ops.gla_gate).

``forward_and_grads`` runs one implementation on fresh leaf copies of the inputs and returns
its output and every input gradient, so two implementations can be compared on the same
numbers. ``interpreter_errors`` runs every op's Triton kernels on CPU with Triton's
interpreter and reports their errors against the references.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

# The largest spacing of adjacent values relative to their size: bf16 keeps 8 significant
# bits, fp16 11, fp32 24, so one ulp is at most 2^-7, 2^-10, 2^-23 of the value.
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def forward_and_grads(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor],
                      grad_out: torch.Tensor) -> list[torch.Tensor]:
    """``[fn(*inputs), d/d inputs[0], d/d inputs[1], ...]`` for the upstream gradient ``grad_out``."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]


def assert_close_in_ulps(got: torch.Tensor, want: torch.Tensor, ulps: float, name: str) -> None:
    """``|got - want| <= ulps`` ulps of ``got``'s dtype relative to the tensor's largest value.

    Scaling by the largest value (not elementwise) bounds the error of sums of terms
    of mixed sign, such as RMSNorm's ``dx``, where an elementwise relative bound cannot hold.
    """
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape)
    scale = want.float().abs().max().clamp_min(1e-30)
    err = (got.float() - want.float()).abs().max()
    assert err <= ulps * ULP[got.dtype] * scale, f"{name}: max error {err.item():.3g}, scale {scale.item():.3g}"


@functools.cache
def interpreter_errors() -> dict[str, list[dict]]:
    """Every fused op's Triton kernels vs its reference under ``TRITON_INTERPRET=1`` on CPU.

    One subprocess for all three ops (the flag is read when triton is imported; each
    launch costs seconds of imports). Returns ``{op: [{case, half, errors}]}`` where
    ``errors`` are the worst errors of the output and of each input gradient, relative to
    the reference tensor's largest value.
    """
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


INTERPRETER_SCRIPT = """
import json, torch
from ops.gla_gate import gate_log_decay
from ops.gla_gate.triton_kernels import gate_log_decay_triton
from ops.rmsnorm import head_rms_norm
from ops.rmsnorm.triton_kernels import head_rms_norm_triton
from ops.swiglu import swiglu
from ops.swiglu.triton_kernels import swiglu_triton

def compare(fast, ref, inputs, grad_out):
    outs = []
    for fn in (fast, ref):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        y = fn(*leaves)
        outs.append([y.detach(), *torch.autograd.grad(y, leaves, grad_out)])
    return [((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
            for a, b in zip(*outs)]

def randn(*shape, scale=1.0, dtype=torch.float32, seed=0):
    return (scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).to(dtype)

out = {"swiglu": [], "head_rms_norm": [], "gate_log_decay": []}
for dtype in (torch.float32, torch.bfloat16):
    half = dtype != torch.float32
    for shape in ((3, 2 * 5), (2, 3, 2 * 1500)):   # 1500 > one column block: a masked tail
        x, g = randn(*shape, scale=3, dtype=dtype), randn(*shape[:-1], shape[-1] // 2, dtype=dtype, seed=1)
        out["swiglu"].append(dict(case=f"{shape}/{dtype}", half=half,
                                  errors=compare(swiglu_triton, swiglu, [x], g)))
    # rows not a multiple of the row block, d not a power of two; 300 rows: several programs
    for shape in ((5, 7, 3, 24), (300, 128)):
        x, g = randn(*shape, scale=2, dtype=dtype), randn(*shape, dtype=dtype, seed=1)
        w = (1 + 0.3 * randn(shape[-1], seed=2)).to(dtype)
        out["head_rms_norm"].append(dict(case=f"{shape}/{dtype}", half=half, errors=compare(
            lambda a, b: head_rms_norm_triton(a, b, 1e-6), lambda a, b: head_rms_norm(a, b, 1e-6),
            [x, w], g)))
    for negate in (False, True):
        x = randn(4, 1500, scale=8, dtype=dtype)
        x[0, :4] = torch.tensor([30.0, -30.0, 90.0, -90.0])   # saturated gates
        g = randn(4, 1500, seed=1)
        out["gate_log_decay"].append(dict(case=f"negate={negate}/{dtype}", half=half, errors=compare(
            lambda t: gate_log_decay_triton(t, 16.0, negate), lambda t: gate_log_decay(t, 16.0, negate),
            [x], g)))
print(json.dumps(out))
"""

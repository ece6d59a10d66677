"""Sparse upcycling: a dense-FFN sbtrain model -> the same model with MoE layers (SpikingBrain-76B).

SpikingBrain-76B (report §2.2) turns chosen dense SwiGLU FFNs into MoE layers of N routed experts
(top-k) plus S always-on shared experts. Every expert starts as a copy of the layer's dense FFN,
rescaled by

    alpha = (S + k/N) ** (-1/3)        (S=1, k=1, N=16: alpha = 0.9800)

on each of the three SwiGLU matrices (gate, up, down); the router is freshly initialised.

Why alpha. Megatron's router with the softmax score function and ``moe_router_pre_softmax=True``
(sbtrain's setting for top-1, ``sbtrain.model.megatron_config._moe_fields``) computes, in
``megatron.core.transformer.moe.moe_utils.topk_routing_with_score_function``::

    scores = softmax(logits)  (fp32);   probs, idx = topk(scores, k)    # no renormalisation

and ``MoELayer`` returns ``shared(x) + sum_{i in idx} probs_i * E_i(x)``. A uniform router
(equal logits, e.g. a zero router weight) gives every score exactly 1/N, so with identical
experts the output is ``S * E(x) + (k/N) * E(x) = (S + k/N) * E(x)``: the (S + k/N) factor that
alpha^3 cancels. (With ``pre_softmax=False``, sbtrain's setting for top-k > 1, the top-k
scores are renormalised to sum to 1 and the factor would be S + 1 instead.)

Exactness. ``down(silu(gate x) * up x)`` is linear in ``up`` and ``down`` but not in ``gate``
(silu(a g) != a silu(g)), so scaling all three matrices by alpha (``scheme="paper"``, the
report's E_i := alpha x FFN with the cube root) scales the output by alpha^2 * silu(alpha g) /
silu(g) ~ alpha^3 only approximately; at alpha = 0.98 the function changes by well under 1%.
``scheme="exact"`` leaves the gate alone and puts alpha^(3/2) on up and on down, which scales
each expert by exactly alpha^3, so the upcycled model reproduces the dense one under a uniform
router (``tests/model/test_upcycle.py`` checks both).

    upcycle_state(dense_state, moe_model_cfg)             # one-process state dicts
    upcycle_checkpoint(dense_ckpt, dense_cfg, moe_cfg, out)   # sbtrain checkpoint -> checkpoint
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from sbtrain.config import ConfigError, load_config
from sbtrain.config.schema import ModelConfig, MoEConfig, RunConfig
from sbtrain.convert.session import load_weights, model_tensors, one_process_model, save_weights


SCHEMES = ("paper", "exact")


def upcycle_alpha(moe: MoEConfig) -> float:
    """alpha = (S + k/N)^(-1/3), S = 1 with a shared expert else 0, k = top_k, N = num_experts."""
    shared = 1.0 if moe.shared_expert else 0.0
    return (shared + moe.top_k / moe.num_experts) ** (-1.0 / 3.0)


def dense_pattern(pattern: str) -> str:
    """``pattern`` with every MoE FFN (``E``) replaced by a dense one (``-``)."""
    return pattern.replace("E", "-")


def moe_layer_indices(model: ModelConfig) -> list[int]:
    """0-based indices of the layers whose FFN is ``E``."""
    return [i for i, (_, ffn) in enumerate(model.layers) if ffn == "E"]


def router_init(key: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """Normal(0, std) router weight, drawn from a generator keyed by (seed, key).

    Keyed per tensor (as ``parallel.init``) so the draw does not depend on the layer order.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    return torch.randn(shape, generator=gen) * std


def _scaled(weight: torch.Tensor, scale: float) -> torch.Tensor:
    if weight.dtype == torch.float32:
        return weight * scale
    return (weight.float() * scale).to(weight.dtype)


def _expert_weights(fc1: torch.Tensor, fc2: torch.Tensor, alpha: float,
                    scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear_fc1, linear_fc2) of one upcycled expert; fc1 = [gate; up] rows."""
    if scheme == "paper":
        return _scaled(fc1, alpha), _scaled(fc2, alpha)
    gate, up = fc1.chunk(2, dim=0)
    half = alpha ** 1.5
    return torch.cat([gate.clone(), _scaled(up, half)]), _scaled(fc2, half)


def _check_dense(dense: dict[str, torch.Tensor], model: ModelConfig) -> None:
    width = model.moe.expert_ffn_hidden_size
    if width and width != model.ffn_hidden_size:
        raise ValueError(f"copy upcycling needs experts as wide as the dense FFN: "
                         f"moe.expert_ffn_hidden_size={width} != ffn_hidden_size="
                         f"{model.ffn_hidden_size} (set it to 0)")
    stray = sorted(k for k in dense if ".mlp.router." in k or ".mlp.experts." in k
                   or ".mlp.shared_experts." in k)
    if stray:
        raise ValueError(f"the source is not dense: it already has MoE tensors, e.g. {stray[0]}")
    h, f = model.hidden_size, model.ffn_hidden_size
    for i in moe_layer_indices(model):
        prefix = f"decoder.layers.{i}.mlp."
        for name, shape in (("linear_fc1.weight", (2 * f, h)), ("linear_fc2.weight", (h, f))):
            key = prefix + name
            if key not in dense:
                raise KeyError(f"layer {i} is an MoE layer in the target but the dense state "
                               f"has no {key}")
            if tuple(dense[key].shape) != shape:
                raise ValueError(f"{key}: shape {tuple(dense[key].shape)}, expected {shape} "
                                 f"(hidden {h}, ffn {f})")


def _upcycle_plan(dense: dict[str, torch.Tensor], model: ModelConfig, alpha: float | None,
                  seed: int, scheme: str) -> dict[str, Callable[[], torch.Tensor]]:
    """Target key -> a function producing its tensor (lazy, so a caller can stream them)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown upcycling scheme {scheme!r}; known: {SCHEMES}")
    _check_dense(dense, model)
    alpha = upcycle_alpha(model.moe) if alpha is None else float(alpha)
    moe, std = model.moe, model.init_method_std
    moe_prefixes = {f"decoder.layers.{i}.mlp." for i in moe_layer_indices(model)}
    plan: dict[str, Callable[[], torch.Tensor]] = {
        key: (lambda t=tensor: t) for key, tensor in dense.items()
        if not any(key.startswith(p) for p in moe_prefixes)
    }
    for prefix in sorted(moe_prefixes):
        fc1, fc2 = dense[prefix + "linear_fc1.weight"], dense[prefix + "linear_fc2.weight"]
        extra = sorted(k for k in dense if k.startswith(prefix)
                       and k not in (prefix + "linear_fc1.weight", prefix + "linear_fc2.weight"))
        if extra:
            raise ValueError(f"cannot upcycle {extra[0]}: only bias-free SwiGLU FFNs are supported")
        expert = _cache(lambda fc1=fc1, fc2=fc2: _expert_weights(fc1, fc2, alpha, scheme))
        owners = [f"{prefix}experts.local_experts.{e}." for e in range(moe.num_experts)]
        if moe.shared_expert:
            owners.append(prefix + "shared_experts.")
        for owner in owners:
            # Each expert gets its own copy (they train apart); produced on demand.
            plan[owner + "linear_fc1.weight"] = lambda f=expert: f()[0].clone()
            plan[owner + "linear_fc2.weight"] = lambda f=expert: f()[1].clone()
        router_key = prefix + "router.weight"
        plan[router_key] = (lambda k=router_key, dt=fc1.dtype: router_init(
            k, (moe.num_experts, model.hidden_size), std, seed).to(dt))
    return plan


def _cache(fn: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
    box: list = []

    def get():
        if not box:
            box.append(fn())
        return box[0]

    return get


def upcycle_state(dense: dict[str, torch.Tensor], model: ModelConfig, alpha: float | None = None,
                  seed: int = 0, scheme: str = "paper") -> dict[str, torch.Tensor]:
    """The one-process state dict of ``model`` (MoE layers ``E``) from a dense one.

    ``dense`` is the one-process state of the same model with ``-`` at every ``E`` (keys
    ``decoder.layers.{i}.mlp.linear_fc1.weight`` [2F, H] = [gate; up] and ``linear_fc2.weight``
    [H, F]). For each MoE layer ``i``, every routed expert
    ``decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc{1,2}.weight`` and the shared
    expert ``decoder.layers.{i}.mlp.shared_experts.linear_fc{1,2}.weight`` are copies of the
    dense FFN scaled by ``alpha`` (default :func:`upcycle_alpha`; ``scheme`` says how, see the
    module docstring) and ``decoder.layers.{i}.mlp.router.weight`` [N, H] is drawn from
    Normal(0, ``model.init_method_std``) keyed by ``seed``. Everything else is taken over
    unchanged (the same tensor objects as in ``dense``, not clones).
    """
    return {key: make() for key, make in _upcycle_plan(dense, model, alpha, seed, scheme).items()}


def _as_run_config(config: str | Path | RunConfig, overrides: list[str] | None = None) -> RunConfig:
    if isinstance(config, RunConfig):
        return config

    return load_config(config, overrides)


def _check_same_model(dense: ModelConfig, moe: ModelConfig) -> None:
    """The dense config must be the MoE config with ``-`` at every ``E`` (the rest equal)."""
    want = [(mixer, "-") for mixer, _ in moe.layers]
    if dense.layers != want:
        got = "".join(m + f for m, f in dense.layers)
        raise ValueError(f"dense pattern {got!r} is not the MoE pattern with '-' for 'E' "
                         f"({dense_pattern(''.join(m + f for m, f in moe.layers))!r})")
    skip = {"pattern", "moe"}
    for field in dataclasses.fields(ModelConfig):
        if field.name in skip:
            continue
        a, b = getattr(dense, field.name), getattr(moe, field.name)
        if a != b:
            raise ValueError(f"model.{field.name} differs: dense {a!r}, MoE {b!r}")


def upcycle_checkpoint(dense_ckpt_dir: str | Path, dense_config: str | Path | RunConfig | None,
                       moe_config: str | Path | RunConfig, out_dir: str | Path,
                       dtype: torch.dtype = torch.float32, alpha: float | None = None,
                       seed: int | None = None, scheme: str = "paper",
                       overrides: list[str] | None = None) -> Path:
    """Upcycle the weights of a dense sbtrain checkpoint into a weights-only MoE checkpoint.

    ``dense_config`` describes the checkpoint's model: the MoE config's model with ``-`` in
    place of every ``E`` (``None`` derives it so). The dense model and then the MoE model are
    built in this process (one at a time; peak host memory ~ dense state + MoE model at
    ``dtype``), and the result is written to ``out_dir`` for ``checkpoint.pretrained`` under
    any layout. ``seed`` defaults to the MoE config's ``train.seed``. ``overrides`` (``a.b=c``)
    apply to the MoE config when it is a path. Returns the written checkpoint path.
    """
    moe_cfg = _as_run_config(moe_config, overrides)
    if dense_config is None:
        dense_cfg = dataclasses.replace(moe_cfg, model=dataclasses.replace(
            moe_cfg.model, pattern=dense_pattern(moe_cfg.model.pattern)))
    else:
        dense_cfg = _as_run_config(dense_config)
    _check_same_model(dense_cfg.model, moe_cfg.model)
    if not moe_cfg.model.has_moe:
        raise ValueError(f"the MoE config's pattern {moe_cfg.model.pattern!r} has no 'E' layer")
    seed = moe_cfg.train.seed if seed is None else seed

    with one_process_model(dense_cfg, dtype) as dense_model:
        step = load_weights(dense_model, dense_ckpt_dir)
        # The model's own tensors (no copy); they outlive the model through this dict.
        dense = model_tensors(dense_model)
    print(f"read dense weights (step {step}) from {dense_ckpt_dir}", flush=True)

    plan = _upcycle_plan(dense, moe_cfg.model, alpha, seed, scheme)
    with one_process_model(moe_cfg, dtype) as model:
        expected = model_tensors(model)
        missing, extra = sorted(set(expected) - set(plan)), sorted(set(plan) - set(expected))
        if missing or extra:
            raise KeyError(f"upcycled state does not match the MoE model: missing {missing[:5]}, "
                           f"unexpected {extra[:5]}")
        with torch.no_grad():
            for key, target in expected.items():
                source = plan.pop(key)()
                if tuple(source.shape) != tuple(target.shape):
                    raise ValueError(f"{key}: shape {tuple(source.shape)} != model's "
                                     f"{tuple(target.shape)}")
                target.copy_(source)
        del dense
        path = save_weights(model, out_dir)
    a = upcycle_alpha(moe_cfg.model.moe) if alpha is None else alpha
    print(f"wrote upcycled checkpoint {path} ({len(moe_layer_indices(moe_cfg.model))} MoE "
          f"layers, alpha {a:.4f}, scheme {scheme})", flush=True)
    return path


def main(argv: list[str]) -> int:
    """``sbtrain convert upcycle`` (to be wired into ``sbtrain.convert.main``)."""
    parser = argparse.ArgumentParser(
        prog="sbtrain convert upcycle", description="dense sbtrain checkpoint -> MoE checkpoint")
    parser.add_argument("--dense", required=True, help="dense sbtrain checkpoint directory")
    parser.add_argument("--dense-config", default=None,
                        help="YAML of the dense model (default: --config with '-' for 'E')")
    parser.add_argument("--config", required=True, help="YAML of the MoE model")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--alpha", type=float, default=None, help="default (S + k/N)^(-1/3)")
    parser.add_argument("--seed", type=int, default=None, help="router init seed (train.seed)")
    parser.add_argument("--scheme", choices=SCHEMES, default="paper")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one MoE config value")
    args = parser.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    try:
        upcycle_checkpoint(args.dense, args.dense_config, args.config, args.out, dtype=dtype,
                           alpha=args.alpha, seed=args.seed, scheme=args.scheme,
                           overrides=args.overrides)
    except (ConfigError, ValueError, KeyError, FileNotFoundError) as exc:
        print(f"convert error: {exc}", file=sys.stderr)
        return 2
    return 0


__all__ = ["SCHEMES", "dense_pattern", "main", "moe_layer_indices", "router_init",
           "upcycle_alpha", "upcycle_checkpoint", "upcycle_state"]

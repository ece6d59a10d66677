"""Bytes one sequence-parallel rank sends and receives per layer and per training step.

The model follows ``ops/gla/sequence_parallel.py`` and ``ops/attention/sequence_parallel.py``:
``parallel.sp = P`` splits every sequence of T tokens into P slices of s = ceil(T / P)
tokens (the largest slice; all equal when P divides T). Sink tokens are replicated on every
rank and move nothing. With b = micro_batch_size, Hkv = num_query_groups / tp and
K = V = D = kv_channels, one layer and one micro-batch move:

- linear attention (``L``, the linear branch of ``H``/``F``): forward, one all-gather of the
  slice's state and decay ``[b, Hkv, K, V + 1]`` fp32 (independent of T); backward, one
  all-reduce of the gathered ``[P, b, Hkv, K, V + 1]`` fp32. With ``data.document_mask``
  also a forward all-gather of the segment edges ``[b, 2]`` int32.
- softmax attention: forward, an all-gather of the slice length ``[1]`` int64 and one of the
  key/value tail ``[b, 2 Hkv, w, D]`` in the activation dtype (bf16, fp32 for fp32 runs),
  w = min(window, s) for a sliding window (``W``, the softmax branch of ``H``) and w = s for
  full attention (``*``, the softmax branch of ``F``); backward, one all-reduce of
  ``[P, b, 2 Hkv, w, D]``. With documents also a forward all-gather of ``[b, w]`` int32.
  That is the ``tails`` exchange (``parallel.sp_softmax_exchange``), the only one for full
  attention. A sliding window under ``halo`` with s >= window instead sends its last window
  ``[b, 2 Hkv, window, D]`` to the next rank and receives the previous rank's (one send and one
  receive of n bytes, the gradients back the same way in backward; with documents also
  ``[b, window]`` int32 forward); ``auto`` takes whichever of the two moves fewer bytes
  (:func:`window_exchange`). The slice-length all-gather stays with either.
- ``train.recompute: full`` runs every forward collective once more in the backward pass,
  ``selective`` those of the linear branches (``RECOMPUTED_BRANCHES``).

Costs are those of ring algorithms, counted per rank, and every rank sends as many bytes as
it receives: an all-gather of n bytes per rank sends (P - 1) n; an all-reduce of an m-byte
tensor sends 2 (P - 1) / P * m; a send/receive of n bytes to/from a neighbour sends n (the
first rank only sends, the last only receives: a middle rank is counted). A step runs ``num_microbatches`` micro-batches through the
layers of the rank's pipeline stage; the step total is the worst stage's.

For comparison, Ulysses (all-to-all over heads) would move per softmax layer q and the output
``[b, s, H D]`` and k, v ``[b, s, Hkv D]`` (H, Hkv per TP rank), each all-to-all sending
(P - 1) / P of its tensor: that forward volume again for the gradients, and once more under
recompute, whatever the window.
"""

from __future__ import annotations

from fractions import Fraction

from sbtrain.config.schema import RunConfig
from sbtrain.profiler.memory import micro_batches_per_step, resolve_bytes, stage_layers

ITEMSIZE = {"fp32": 4, "bf16": 2, "int32": 4, "int64": 8}
MIXER_BRANCHES = {"L": ("linear",), "W": ("window",), "*": ("full",),
                  "H": ("linear", "window"), "F": ("linear", "full")}
RECOMPUTED_BRANCHES = {"none": (), "selective": ("linear",), "full": ("linear", "window", "full")}
"""Branches whose forward runs again in backward under each resolved ``train.recompute``."""
"""Branches of each mixer that communicate: the GLA state exchange and the softmax halo."""


def _exact(value: Fraction) -> int | float:
    return int(value) if value.denominator == 1 else float(value)


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _collective(sp: int, what: str, op: str, phase: str, shape: list[int], dtype: str) -> dict:
    """One collective with the bytes each rank sends (= receives) under the ring algorithm;
    ``shape`` is the per-rank input of an all-gather and the whole tensor of an all-reduce."""
    size = _numel(shape) * ITEMSIZE[dtype]
    sent = (sp - 1) * size if op == "all_gather" else Fraction(2 * (sp - 1) * size, sp)
    return {"what": what, "op": op, "phase": phase, "shape": shape, "dtype": dtype,
            "tensor_bytes": size, "bytes": _exact(Fraction(sent))}


def _linear_collectives(cfg: RunConfig, sp: int, kv_heads: int) -> list[dict]:
    b, d = cfg.train.micro_batch_size, cfg.model.kv_channels
    packet = [b, kv_heads, d, d + 1]
    out = [_collective(sp, "GLA state + decay", "all_gather", "forward", packet, "fp32"),
           _collective(sp, "GLA state grads", "all_reduce", "backward", [sp, *packet], "fp32")]
    if cfg.data.document_mask:
        out.append(_collective(sp, "segment edges", "all_gather", "forward", [b, 2], "int32"))
    return out


def _send_recv(what: str, phase: str, shape: list[int], dtype: str) -> dict:
    """One send to the next rank and one receive from the previous (``ops.comm``
    ``from_previous_rank``; its backward sends the gradient back): n bytes each way."""
    size = _numel(shape) * ITEMSIZE[dtype]
    return {"what": what, "op": "send_recv", "phase": phase, "shape": shape, "dtype": dtype,
            "tensor_bytes": size, "bytes": size}


def _softmax_collectives(cfg: RunConfig, sp: int, kv_heads: int, width: int,
                         act_bytes: int, exchange: str = "tails") -> list[dict]:
    """What ``ops/attention/sequence_parallel.py``'s ``exchange`` (tails | halo) issues for
    keys ``width`` tokens wide (the gathered tail; the halo's window)."""
    b, d = cfg.train.micro_batch_size, cfg.model.kv_channels
    dtype = "bf16" if act_bytes == 2 else "fp32"
    tail = [b, 2 * kv_heads, width, d]
    out = [_collective(sp, "slice length", "all_gather", "forward", [1], "int64")]
    if exchange == "halo":
        out += [_send_recv("K/V halo", "forward", tail, dtype),
                _send_recv("K/V halo grads", "backward", tail, dtype)]
        if cfg.data.document_mask:
            out.append(_send_recv("halo segment ids", "forward", [b, width], "int32"))
        return out
    out += [_collective(sp, "K/V tail", "all_gather", "forward", tail, dtype),
            _collective(sp, "K/V tail grads", "all_reduce", "backward", [sp, *tail], dtype)]
    if cfg.data.document_mask:
        out.append(_collective(sp, "tail segment ids", "all_gather", "forward", [b, width],
                               "int32"))
    return out


def window_exchange(cfg: RunConfig, device_type: str = "cuda") -> str:
    """The exchange a sliding-window layer runs under ``parallel.sp_softmax_exchange``:
    ``halo`` only when every slice holds a window (the op falls back to ``tails`` otherwise);
    ``auto``: the one of the two that moves fewer bytes per layer and micro-batch (recompute
    included), which is ``halo`` whenever it can run (n each way against (P - 1) n forward
    and 2 (P - 1) n backward). ``parallel.sequence.resolved_softmax_exchange`` hands ``auto``
    to the ops as ``halo``, whose own fallback makes the same choice per layer."""
    p, train = cfg.parallel, cfg.train
    slice_tokens = -(-train.seq_length // p.sp)
    if p.sp_softmax_exchange == "tails" or slice_tokens < cfg.model.sliding_window:
        return "tails"
    if p.sp_softmax_exchange == "halo":
        return "halo"
    kv_heads = max(1, cfg.model.num_query_groups // p.tp)
    act_bytes = int(resolve_bytes(train.precision, device_type).activation)
    again = "window" in RECOMPUTED_BRANCHES[train.recompute]
    cost = {}
    for exchange in ("halo", "tails"):
        collectives = _softmax_collectives(cfg, p.sp, kv_heads, cfg.model.sliding_window,
                                           act_bytes, exchange)
        cost[exchange] = _totals(collectives, collectives if again else [])["total_bytes"]
    return min(cost, key=cost.get)


def _totals(collectives: list[dict], recomputed: list[dict]) -> dict:
    forward = sum(c["bytes"] for c in collectives if c["phase"] == "forward")
    backward = sum(c["bytes"] for c in collectives if c["phase"] == "backward")
    again = sum(c["bytes"] for c in recomputed if c["phase"] == "forward")
    return {"forward_bytes": forward, "backward_bytes": backward, "recompute_bytes": again,
            "total_bytes": forward + backward + again}


def _ulysses(cfg: RunConfig, sp: int, slice_tokens: int, act_bytes: int,
             exchanged: dict[str, dict], exchanges: dict[str, str]) -> dict:
    """What an all-to-all over heads would move per softmax layer, next to the bytes of the
    exchange the run uses (``exchanges[kind]``)."""
    model, p = cfg.model, cfg.parallel
    heads, kv_heads = model.num_attention_heads // p.tp, max(1, model.num_query_groups // p.tp)
    per_head = cfg.train.micro_batch_size * slice_tokens * model.kv_channels * act_bytes
    # q and the output have H heads, k and v Hkv; each all-to-all keeps 1/P of its tensor
    forward = Fraction((sp - 1) * (2 * heads + 2 * kv_heads) * per_head, sp)
    again = forward if "full" in RECOMPUTED_BRANCHES[cfg.train.recompute] else Fraction(0)
    total = 2 * forward + again
    per_layer = {"forward_bytes": _exact(forward), "backward_bytes": _exact(forward),
                 "recompute_bytes": _exact(again), "total_bytes": _exact(total)}
    kinds = {kind: {**per_layer, "exchange": exchanges[kind],
                    "exchange_total_bytes": totals["total_bytes"],
                    "ratio": float(total / totals["total_bytes"])}
             for kind, totals in exchanged.items()}
    return {"heads": heads, "kv_heads": kv_heads,
            "heads_divisible": heads % sp == 0 and kv_heads % sp == 0, "kinds": kinds}


def sp_comm_per_rank(cfg: RunConfig, world_size: int, device_type: str = "cuda") -> dict:
    """Sequence-parallel bytes per rank (see the module docstring for the model).

    Returns, when ``parallel.sp > 1``: the sizes used (``sp``, ``slice_tokens``, ``kv_heads``,
    ``activation_bytes``, ``num_microbatches``, ...); ``layers``, per mixer symbol present:
    ``count`` (layers of the model), ``exchange`` (per softmax branch, ``tails`` or ``halo``),
    ``forward_bytes``, ``backward_bytes``, ``recompute_bytes`` and ``total_bytes`` per layer
    and micro-batch, and the ``collectives`` behind them; ``exchanges`` (per softmax kind);
    ``stages`` (bytes per micro-batch and per step of one rank of each pipeline stage),
    ``worst_stage`` and ``step_bytes`` (its step total); ``ulysses``, the all-to-all
    alternative per softmax kind (``window``/``full``). Every byte count is sent and received
    alike. With ``sp == 1`` only ``{"enabled": False, "sp": 1, "reason": ...}``.
    """
    p, train = cfg.parallel, cfg.train
    if p.sp == 1:
        return {"enabled": False, "sp": 1, "reason": "sequences are not split (sp = 1)"}
    sp, window = p.sp, cfg.model.sliding_window
    slice_tokens = -(-train.seq_length // sp)
    kv_heads = max(1, cfg.model.num_query_groups // p.tp)
    act_bytes = int(resolve_bytes(train.precision, device_type).activation)
    exchanges = {"window": window_exchange(cfg, device_type), "full": "tails"}
    branches = {
        "linear": _linear_collectives(cfg, sp, kv_heads),
        "window": _softmax_collectives(cfg, sp, kv_heads, min(window, slice_tokens), act_bytes,
                                       exchanges["window"]),
        "full": _softmax_collectives(cfg, sp, kv_heads, slice_tokens, act_bytes),
    }
    mixers = [mixer for mixer, _ in cfg.model.layers]
    again = RECOMPUTED_BRANCHES[train.recompute]
    layers = {}
    for mixer in dict.fromkeys(mixers):
        collectives = [c for branch in MIXER_BRANCHES[mixer] for c in branches[branch]]
        repeated = [c for branch in MIXER_BRANCHES[mixer] if branch in again
                    for c in branches[branch]]
        layers[mixer] = {"count": mixers.count(mixer),
                         "exchange": {kind: exchanges[kind] for kind in MIXER_BRANCHES[mixer]
                                      if kind in exchanges},
                         **_totals(collectives, repeated), "collectives": collectives}
    dp = max(1, p.resolved_dp(world_size))
    micro_batches = micro_batches_per_step(cfg, dp)
    stages = []
    for stage, stage_mixers in enumerate(stage_layers(cfg)):
        per_mb = sum(layers[mixer]["total_bytes"] for mixer, _ in stage_mixers)
        stages.append({"stage": stage, "layers": len(stage_mixers), "bytes_per_microbatch": per_mb,
                       "bytes_per_step": per_mb * micro_batches})
    worst = max(stages, key=lambda s: s["bytes_per_step"])
    softmax_kinds = {kind for mixer in layers for kind in MIXER_BRANCHES[mixer]} - {"linear"}
    exchanged = {kind: _totals(branches[kind], branches[kind] if kind in again else [])
                 for kind in ("window", "full") if kind in softmax_kinds}
    return {
        "enabled": True, "sp": sp, "seq_length": train.seq_length, "slice_tokens": slice_tokens,
        "micro_batch_size": train.micro_batch_size, "kv_heads": kv_heads,
        "head_dim": cfg.model.kv_channels, "sliding_window": window,
        "activation_bytes": act_bytes, "recompute": train.recompute,
        "document_mask": cfg.data.document_mask, "dp": dp, "num_microbatches": micro_batches,
        "exchanges": {kind: exchanges[kind] for kind in exchanged},
        "layers": layers, "stages": stages, "worst_stage": worst["stage"],
        "step_bytes": worst["bytes_per_step"],
        "ulysses": _ulysses(cfg, sp, slice_tokens, act_bytes, exchanged, exchanges),
    }

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
  That is the ``tails`` exchange (``parallel.sp_softmax_exchange``). A sliding window under
  ``halo`` with s >= window instead sends its last window ``[b, 2 Hkv, window, D]`` to the
  next rank and receives the previous rank's (one send and one receive of n bytes, the
  gradients back the same way in backward; with documents also ``[b, window]`` int32
  forward); full attention and shorter slices keep ``tails``. ``ulysses``
  (``ops/attention/ulysses.py``) all-to-alls q, k, v ``[b, H + 2 Hkv, s, D]`` and the output
  ``[b, H, s, D]`` forward and their gradients backward, whatever the window (with documents
  also an all-gather of ``[b, s]`` int32 forward); it needs H and Hkv (per TP rank) to
  divide by P (:func:`ulysses_blocker`). ``auto`` takes per layer kind (window, full) the
  eligible exchange that moves the fewest bytes (:func:`softmax_exchanges`, which the run uses
  too). The slice-length all-gather stays with every exchange.
- ``train.recompute: full`` runs every forward collective once more in the backward pass,
  ``selective`` those of the linear branches (``RECOMPUTED_BRANCHES``).

Costs are those of ring algorithms, counted per rank, and every rank sends as many bytes as
it receives: an all-gather of n bytes per rank sends (P - 1) n; an all-reduce of an m-byte
tensor sends 2 (P - 1) / P * m; an all-to-all of an m-byte tensor per rank sends (P - 1) / P * m;
a send/receive of n bytes to/from a neighbour sends n (the first rank only sends, the last
only receives: a middle rank is counted). A step runs ``num_microbatches`` micro-batches
through the layers of the rank's pipeline stage; the step total is the worst stage's.
"""

from __future__ import annotations

from fractions import Fraction

from sbtrain.config.errors import ConfigError
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
    ``shape`` is the per-rank input of an all-gather or all-to-all and the whole tensor of an
    all-reduce."""
    size = _numel(shape) * ITEMSIZE[dtype]
    sent = {"all_gather": (sp - 1) * size, "all_reduce": Fraction(2 * (sp - 1) * size, sp),
            "all_to_all": Fraction((sp - 1) * size, sp)}[op]
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


SOFTMAX_KINDS = ("window", "full")
"""The softmax layer kinds ``auto`` chooses an exchange for: sliding window (``W``, the
softmax branch of ``H``) and full attention (``*``, that of ``F``)."""


def _softmax_collectives(cfg: RunConfig, kind: str, exchange: str, act_bytes: int) -> list[dict]:
    """What ``ops/attention/sequence_parallel.py`` issues per layer of ``kind`` under
    ``exchange`` (tails | halo | ulysses; halo only where it runs: a window within a slice)."""
    p, b, d = cfg.parallel, cfg.train.micro_batch_size, cfg.model.kv_channels
    sp, slice_tokens = p.sp, -(-cfg.train.seq_length // p.sp)
    heads, kv_heads = _heads(cfg)
    width = min(cfg.model.sliding_window, slice_tokens) if kind == "window" else slice_tokens
    dtype = "bf16" if act_bytes == 2 else "fp32"
    tail = [b, 2 * kv_heads, width, d]
    out = [_collective(sp, "slice length", "all_gather", "forward", [1], "int64")]
    if exchange == "ulysses":
        qkv, o = [b, heads + 2 * kv_heads, slice_tokens, d], [b, heads, slice_tokens, d]
        out += [_collective(sp, "q/k/v all-to-all", "all_to_all", "forward", qkv, dtype),
                _collective(sp, "output all-to-all", "all_to_all", "forward", o, dtype),
                _collective(sp, "output grads all-to-all", "all_to_all", "backward", o, dtype),
                _collective(sp, "q/k/v grads all-to-all", "all_to_all", "backward", qkv, dtype)]
        if cfg.data.document_mask:
            out.append(_collective(sp, "segment ids", "all_gather", "forward", [b, slice_tokens], "int32"))
        return out
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


def _heads(cfg: RunConfig) -> tuple[int, int]:
    """Query heads and kv heads per TP rank."""
    tp = cfg.parallel.tp
    return cfg.model.num_attention_heads // tp, max(1, cfg.model.num_query_groups // tp)


def ulysses_blocker(cfg: RunConfig) -> str | None:
    """Why the run cannot use the Ulysses exchange, or None: the all-to-all gives each SP rank
    whole heads (``ops/attention/ulysses.py``), so query heads and kv heads per TP rank must
    divide by sp (equal slices are the trainer's: seq_length divides by sp)."""
    heads, kv_heads = _heads(cfg)
    if heads % cfg.parallel.sp or kv_heads % cfg.parallel.sp:
        return (f"query heads ({heads}) and kv heads ({kv_heads}) per TP rank must divide by "
                f"sp = {cfg.parallel.sp}")
    return None


def exchange_bytes(cfg: RunConfig, kind: str, device_type: str = "cuda") -> dict[str, int | float]:
    """Bytes per layer of ``kind`` and micro-batch (recompute included) of every exchange that
    can serve it, eligible or not: ``tails``, ``halo`` (a window that fits in a slice) and
    ``ulysses`` (see :func:`ulysses_blocker`)."""
    if cfg.train.recompute not in RECOMPUTED_BRANCHES:
        raise ValueError("resolve train.recompute: auto first (sbtrain.profiler.recompute)")
    act_bytes = int(resolve_bytes(cfg.train.precision, device_type).activation)
    again = kind in RECOMPUTED_BRANCHES[cfg.train.recompute]
    slice_tokens = -(-cfg.train.seq_length // cfg.parallel.sp)
    names = ["tails", "ulysses"]
    if kind == "window" and slice_tokens >= cfg.model.sliding_window:
        names.insert(0, "halo")
    costs = {}
    for name in names:
        collectives = _softmax_collectives(cfg, kind, name, act_bytes)
        costs[name] = _totals(collectives, collectives if again else [])["total_bytes"]
    return costs


def softmax_exchanges(cfg: RunConfig, device_type: str = "cuda") -> dict[str, str]:
    """The exchange each softmax layer kind (``window``, ``full``) runs under
    ``parallel.sp_softmax_exchange``, what the run hands the mixers
    (``parallel.sequence.sp_context``) and what ``sbtrain plan`` counts: ``tails`` and
    ``ulysses`` as written; ``halo`` where it runs (a window within a slice), else ``tails``;
    ``auto`` the eligible one that moves the fewest bytes (:func:`exchange_bytes`; Ulysses is
    eligible when :func:`ulysses_blocker` finds nothing). ``ulysses`` on heads it cannot split
    is a ConfigError naming the key."""
    setting = cfg.parallel.sp_softmax_exchange
    blocker = ulysses_blocker(cfg) if cfg.parallel.sp > 1 else None
    if setting == "ulysses" and blocker:
        raise ConfigError(f"ulysses: {blocker}; use tails, halo or auto",
                          key="parallel.sp_softmax_exchange")
    chosen = {}
    for kind in SOFTMAX_KINDS:
        costs = exchange_bytes(cfg, kind, device_type) if cfg.parallel.sp > 1 else {"tails": 0}
        if blocker:
            costs.pop("ulysses", None)
        if setting == "auto":
            chosen[kind] = min(costs, key=costs.get)
        else:
            chosen[kind] = setting if setting in costs else "tails"
    return chosen


def _totals(collectives: list[dict], recomputed: list[dict]) -> dict:
    forward = sum(c["bytes"] for c in collectives if c["phase"] == "forward")
    backward = sum(c["bytes"] for c in collectives if c["phase"] == "backward")
    again = sum(c["bytes"] for c in recomputed if c["phase"] == "forward")
    return {"forward_bytes": forward, "backward_bytes": backward, "recompute_bytes": again,
            "total_bytes": forward + backward + again}


def sp_comm_per_rank(cfg: RunConfig, world_size: int, device_type: str = "cuda") -> dict:
    """Sequence-parallel bytes per rank (see the module docstring for the model).

    Returns, when ``parallel.sp > 1``: the sizes used (``sp``, ``slice_tokens``, ``kv_heads``,
    ``activation_bytes``, ``num_microbatches``, ...); ``layers``, per mixer symbol present:
    ``count`` (layers of the model), ``exchange`` (per softmax branch: tails, halo, ulysses),
    ``forward_bytes``, ``backward_bytes``, ``recompute_bytes`` and ``total_bytes`` per layer
    and micro-batch, and the ``collectives`` behind them; ``exchanges`` (per softmax kind);
    ``stages`` (bytes per micro-batch and per step of one rank of each pipeline stage),
    ``worst_stage`` and ``step_bytes`` (its step total); ``exchange_bytes``, per softmax kind
    present, every exchange's bytes per layer and micro-batch (what ``auto`` compares);
    ``ulysses``: its heads per TP rank and why it is not eligible (``blocker``, or None). Every
    byte count is sent and received alike. With ``sp == 1`` only ``{"enabled": False, "sp": 1, "reason": ...}``.
    """
    p, train = cfg.parallel, cfg.train
    if p.sp == 1:
        return {"enabled": False, "sp": 1, "reason": "sequences are not split (sp = 1)"}
    sp, window = p.sp, cfg.model.sliding_window
    slice_tokens = -(-train.seq_length // sp)
    heads, kv_heads = _heads(cfg)
    act_bytes = int(resolve_bytes(train.precision, device_type).activation)
    exchanges = softmax_exchanges(cfg, device_type)
    branches = {"linear": _linear_collectives(cfg, sp, kv_heads),
                **{kind: _softmax_collectives(cfg, kind, exchanges[kind], act_bytes)
                   for kind in SOFTMAX_KINDS}}
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
    present = {kind for mixer in layers for kind in MIXER_BRANCHES[mixer]}
    kinds = [kind for kind in SOFTMAX_KINDS if kind in present]
    return {
        "enabled": True, "sp": sp, "seq_length": train.seq_length, "slice_tokens": slice_tokens,
        "micro_batch_size": train.micro_batch_size, "kv_heads": kv_heads,
        "head_dim": cfg.model.kv_channels, "sliding_window": window,
        "activation_bytes": act_bytes, "recompute": train.recompute,
        "document_mask": cfg.data.document_mask, "dp": dp, "num_microbatches": micro_batches,
        "exchanges": {kind: exchanges[kind] for kind in kinds},
        "exchange_bytes": {kind: exchange_bytes(cfg, kind, device_type) for kind in kinds},
        "layers": layers, "stages": stages, "worst_stage": worst["stage"],
        "step_bytes": worst["bytes_per_step"],
        "ulysses": {"heads": heads, "kv_heads": kv_heads, "blocker": ulysses_blocker(cfg)},
    }

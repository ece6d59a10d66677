"""Typed run configuration: one small dataclass per component.

Every section validates itself in ``__post_init__``; rules that span sections live in
``sbtrain.config.validate``. YAML is mapped onto these classes strictly by
``sbtrain.config.load`` (unknown keys and wrong types are errors).
"""

from __future__ import annotations

import signal
import functools
import logging
from dataclasses import dataclass, field

from sbtrain.config.errors import ConfigError

# One layer = a mixer symbol followed by an FFN symbol, e.g. "*-" (attention + dense MLP).
MIXER_SYMBOLS = {
    "*": "full causal softmax attention",
    "W": "sliding-window softmax attention",
    "L": "gated linear attention (GLA)",
    "H": "intra-layer parallel hybrid: linear + sliding-window attention",
    "F": "intra-layer parallel hybrid: linear + full attention",
}
FFN_SYMBOLS = {"-": "dense SwiGLU MLP", "E": "mixture of experts"}
PIPE_SYMBOL = "|"
CATCHABLE_SIGNALS = {s.name for s in signal.Signals} - {"SIGKILL", "SIGSTOP"}


def check_at_least(section: object, prefix: str, minimum: int, names: tuple[str, ...]) -> None:
    """Each named field of ``section`` must be >= ``minimum`` (counts, sizes, intervals)."""
    for name in names:
        value = getattr(section, name)
        if value < minimum:
            raise ConfigError(f"must be >= {minimum}, got {value}", key=f"{prefix}.{name}")


def parse_pattern(pattern: str) -> list[tuple[str, str]]:
    """Split a layer pattern such as ``"L-W-|L-WE"`` into (mixer, ffn) pairs.

    Whitespace and ``|`` (an explicit pipeline cut, accepted for readability and checked
    against the even split) are ignored for the layer list.
    """
    symbols = [c for c in pattern if not c.isspace() and c != PIPE_SYMBOL]
    if len(symbols) % 2:
        raise ValueError(f"pattern {pattern!r} has an odd number of symbols; each layer is a pair")
    layers = []
    for i in range(0, len(symbols), 2):
        mixer, ffn = symbols[i], symbols[i + 1]
        if mixer not in MIXER_SYMBOLS:
            raise ValueError(f"unknown mixer symbol {mixer!r} in pattern; known: {MIXER_SYMBOLS}")
        if ffn not in FFN_SYMBOLS:
            raise ValueError(f"unknown FFN symbol {ffn!r} in pattern; known: {FFN_SYMBOLS}")
        layers.append((mixer, ffn))
    return layers


@dataclass
class MoEConfig:
    """Mixture-of-experts settings, used by layers whose FFN symbol is ``E``."""

    num_experts: int = 4
    """Routed experts per MoE layer."""
    top_k: int = 1
    """Experts chosen per token."""
    shared_expert: bool = True
    """Add one always-on shared expert of the FFN's width."""
    expert_ffn_hidden_size: int = 0
    """Width of each routed expert; 0 means the model's ffn_hidden_size (copy upcycling)."""
    aux_loss_coeff: float = 1e-2
    """Load-balancing auxiliary loss coefficient."""
    dispatcher: str = "alltoall"
    """Token dispatcher: ``alltoall`` or ``allgather``."""

    def __post_init__(self) -> None:
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"need 1 <= top_k <= num_experts, got {self.top_k}/{self.num_experts}",
                              key="moe.top_k")
        if self.dispatcher not in ("alltoall", "allgather"):
            raise ConfigError(f"unknown dispatcher {self.dispatcher!r}", key="moe.dispatcher")


@dataclass
class GLAConfig:
    """Gated linear attention (``L`` layers), SpikingBrain-7B defaults. The linear branch of
    ``H``/``F`` layers is fixed by the 76B report instead: sigmoid q/k, gate tied to the key."""

    gate_rank: int = 16
    """Width of the low-rank gate projection: hidden -> gate_rank -> kv dims."""
    gate_normalizer: float = 16.0
    """log decay = logsigmoid(gate) / gate_normalizer, so each step keeps sigmoid^(1/16)."""
    feature_map: str = "relu"
    """Non-negative map applied to q and k of ``L`` layers: ``relu`` (7B) or ``sigmoid``."""

    def __post_init__(self) -> None:
        if self.gate_rank < 1:
            raise ConfigError("must be >= 1", key="gla.gate_rank")
        if self.gate_normalizer <= 0:
            raise ConfigError("must be > 0", key="gla.gate_normalizer")
        if self.feature_map not in ("relu", "sigmoid"):
            raise ConfigError(f"unknown feature map {self.feature_map!r}; known: relu, sigmoid",
                              key="gla.feature_map")


@dataclass
class HybridConfig:
    """Intra-layer parallel hybrid mixers (``H``, ``F``: SpikingBrain-76B)."""

    shared_projections: bool = True
    """One q/k/v/o set for the linear and the softmax branch. The report does not say; shared
    is the reading whose parameter count matches "76B-A12B" (docs/76b.md §2); false gives the
    softmax branch its own q/k/v/o."""


@dataclass
class ModelConfig:
    """Architecture. Sizes follow Megatron naming; the layer layout is one pattern string."""

    pattern: str = "*-*-"
    """Layer layout, a pair of symbols per layer (mixer then FFN); see MIXER_SYMBOLS/FFN_SYMBOLS."""
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    """Key/value heads (GQA groups)."""
    head_dim: int = 0
    """Per-head width; 0 means hidden_size / num_attention_heads."""
    ffn_hidden_size: int = 128
    vocab_size: int = 256
    max_position_embeddings: int = 4096
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    """Biases on q/k/v projections (Qwen2 has them)."""
    untie_embeddings: bool = True
    init_method_std: float = 0.02
    sliding_window: int = 4096
    """Previous tokens each query sees in ``W``/``H`` mixers (plus itself)."""
    sink_tokens: int = 0
    """Learnable tokens prepended to every sequence (SpikingBrain-76B: 128): every token
    attends to them, they attend only to each other, the loss skips them."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    gla: GLAConfig = field(default_factory=GLAConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)

    def __post_init__(self) -> None:
        check_at_least(self, "model", 1, ("hidden_size", "num_attention_heads",
                                          "num_query_groups", "ffn_hidden_size", "vocab_size",
                                          "max_position_embeddings", "sliding_window"))
        check_at_least(self, "model", 0, ("head_dim",))
        if not self.norm_eps > 0 or not self.init_method_std > 0:
            raise ConfigError("norm_eps and init_method_std must be > 0", key="model.norm_eps")
        try:
            layers = parse_pattern(self.pattern)
        except ValueError as exc:
            raise ConfigError(str(exc), key="model.pattern") from None
        if not layers:
            raise ConfigError("pattern describes no layers", key="model.pattern")
        if self.hidden_size % self.num_attention_heads and not self.head_dim:
            raise ConfigError("hidden_size must divide by num_attention_heads (or set head_dim)",
                              key="model.num_attention_heads")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError("num_attention_heads must divide by num_query_groups",
                              key="model.num_query_groups")
        if self.sink_tokens < 0:
            raise ConfigError("must be >= 0", key="model.sink_tokens")

    @property
    def layers(self) -> list[tuple[str, str]]:
        return parse_pattern(self.pattern)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def has_moe(self) -> bool:
        return any(ffn == "E" for _, ffn in self.layers)


@dataclass
class ParallelConfig:
    """Parallel sizes. World size must equal dp * pp * tp * sp; ep is carved out of dp * sp."""

    dp: int = 0
    """Data-parallel size; 0 means world_size / (pp * tp * sp)."""
    pp: int = 1
    tp: int = 1
    ep: int = 1
    sp: int = 1
    """Sequence (context) parallel size: Megatron's context_parallel_size."""
    tp_sequence_parallel: bool = False
    """Megatron's tensor-parallel sequence parallelism (activations between layers split over the
    TP group); needed for MoE with tp > 1. Not ``sp``, which splits sequences over its own group.
    Called ``sequence_parallel`` before 2026-12 (still read, with a deprecation warning)."""
    timeout_minutes: float = 30.0
    """Process-group (collective) timeout; a collective waiting longer fails the run. Keep it
    above train.hang_timeout_minutes, so that the watchdog reports a hang (with stacks) first."""
    overlap_grad_reduce: bool | str = "auto"
    """Reduce(-scatter) the data-parallel gradients bucket by bucket while backward still runs
    (Megatron DDP's overlap_grad_reduce) instead of all at once after it. ``auto``: on GPUs,
    off on CPU (gloo gains nothing)."""
    overlap_param_gather: bool | str = "auto"
    """With the distributed optimizer: all-gather the updated parameters bucket by bucket
    during the next forward (each module waits for its own bucket) instead of right after the
    optimizer step. ``auto``: on GPUs when optim.distributed_optimizer, off on CPU."""
    bucket_size: int = 0
    """Elements per gradient / parameter bucket of the overlapped communication; 0: Megatron's
    default, max(40M, 1M x dp). Ignored when neither overlap is on (one bucket)."""
    sp_softmax_exchange: str = "tails"
    """How softmax layers see earlier slices under sp > 1 (ops/attention/sequence_parallel.py):
    ``tails`` (every rank all-gathers every rank's last window; every key for full attention),
    ``halo`` (send/recv from the previous rank only, for sliding windows when every slice
    holds at least one window; otherwise tails), ``ulysses`` (all-to-all over heads, then
    attention over the whole sequence: needs query and kv heads per TP rank divisible by sp)
    or ``auto`` (per layer kind, sliding window and full, the eligible one that moves the
    fewest bytes by ``sbtrain plan``'s count). The default stays ``tails`` because halo and
    ulysses have not run on GPUs yet (they are tested on CPU/gloo only)."""

    sp_early_exchange: bool = True
    """Under sp > 1, issue each layer's exchange before the work that does not need it and wait
    after: the GLA state all-gather during the local GLA kernel, the softmax keys' exchange
    (tails, halo) during the attention of the slice over its own keys (merged with the received
    keys' part by log-sum-exp), and the backward all-reduce/send-back during those parts'
    backward. Same results either way; false blocks at each exchange (the A/B baseline,
    ``bench/bench_layouts.py --sp-blocking-too``)."""

    def __post_init__(self) -> None:
        for name in ("pp", "tp", "ep", "sp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", key=f"parallel.{name}")
        if self.dp < 0:
            raise ConfigError("must be >= 0 (0 = infer from world size)", key="parallel.dp")
        if not self.timeout_minutes > 0:
            raise ConfigError("must be > 0", key="parallel.timeout_minutes")
        for name in ("overlap_grad_reduce", "overlap_param_gather"):
            if isinstance(getattr(self, name), str) and getattr(self, name) != "auto":
                raise ConfigError(f"expected true, false or auto, got {getattr(self, name)!r}",
                                  key=f"parallel.{name}")
        check_at_least(self, "parallel", 0, ("bucket_size",))
        if self.sp_softmax_exchange not in ("tails", "halo", "ulysses", "auto"):
            raise ConfigError(f"unknown exchange {self.sp_softmax_exchange!r}; known: tails, "
                              "halo, ulysses, auto", key="parallel.sp_softmax_exchange")

    def resolved_dp(self, world_size: int) -> int:
        return self.dp or world_size // (self.pp * self.tp * self.sp)

    def resolved_overlap(self, name: str, on_gpu: bool) -> bool:
        """``overlap_grad_reduce`` / ``overlap_param_gather`` with ``auto`` resolved (the
        distributed-optimizer condition of the param gather is checked by the caller)."""
        value = getattr(self, name)
        return on_gpu if value == "auto" else bool(value)


RECOMPUTE_POLICIES = {
    "none": "keep every activation",
    "selective": "recompute the GLA / parallel-hybrid mixer cores and the SwiGLU products",
    "full": "keep each layer's input, recompute the whole layer in backward",
    "auto": "the cheapest policy whose memory plan fits the device",
}
_RECOMPUTE_ALIASES = {True: "full", False: "none"}


def normalize_recompute(value) -> str:
    """``train.recompute`` as a policy name; the old booleans map to full / none (warned once)."""
    if isinstance(value, bool):
        _warn_recompute_alias(value)
        return _RECOMPUTE_ALIASES[value]
    if value not in RECOMPUTE_POLICIES:
        raise ConfigError(f"unknown policy {value!r}; known: {', '.join(RECOMPUTE_POLICIES)}",
                          key="train.recompute")
    return value


@functools.cache
def _warn_recompute_alias(value: bool) -> None:
    logging.getLogger(__name__).warning(
        "train.recompute: %s is deprecated; write train.recompute: %s",
        str(value).lower(), _RECOMPUTE_ALIASES[value])


LOSS_CHUNK_AUTO_TOKENS = 8192
"""Chunk of ``train.loss_chunk_tokens: auto``: at SpikingBrain's 152K vocabulary one chunk's bf16
logits are 2.5 GB (Megatron's loss holds the whole logits plus fp32 copies), and the logits GEMMs
are large enough to run at full rate; a micro-batch of up to 8K tokens is one chunk."""


@dataclass
class TrainConfig:
    """Steps, batch sizes and precision."""

    seq_length: int = 64
    micro_batch_size: int = 2
    global_batch_size: int = 4
    """Samples per optimizer step, across all data-parallel ranks (gradient accumulation fills it)."""
    train_iters: int = 10
    eval_interval: int = 0
    """Run evaluation every this many steps; 0 disables."""
    eval_iters: int = 2
    log_interval: int = 1
    exit_at_step: int = 0
    """Stop after this step (saving first when checkpoint.save_dir is set), as an interrupted
    job would; a relaunch resumes there. 0 runs to train_iters."""
    seed: int = 1234
    precision: str = "auto"
    """``auto`` (bf16 on GPU, fp32 on CPU), ``bf16`` or ``fp32``."""
    recompute: str | bool = "none"
    """Activation recomputation (``RECOMPUTE_POLICIES``): ``none``; ``selective`` (the cheap,
    memory-heavy parts: the cores of GLA / parallel-hybrid mixers, the FFNs' SwiGLU product);
    ``full`` (every layer keeps only its input); ``auto`` (the cheapest policy whose memory
    plan fits the device, resolved at train start). Booleans are deprecated aliases:
    true = full, false = none."""
    loss_chunk_tokens: int | str = "auto"
    """How the last stage computes the LM loss. ``auto``: ``ops.loss.linear_cross_entropy`` with
    ``LOSS_CHUNK_AUTO_TOKENS`` tokens per chunk on GPUs when tp == 1 (its Triton backend: bf16
    logits of one chunk, no fp32 copy), else (CPU, tp > 1) as 0. 0: Megatron's output layer and
    cross-entropy over the whole ``[tokens, vocab]`` logits (fp32 copies included).
    N > 0: ``ops.loss``, N tokens' logits at a time, recomputed in backward (tp 1 only)."""
    run_dir: str = "runs/default"
    """Where metrics.jsonl, the resolved config and the profile summary go."""
    max_skipped_steps: int = 5
    """A step whose loss or gradients are non-finite on any rank (or a loss spike) is skipped
    on every rank; this many consecutive skips stop the run (exit 3, nothing saved)."""
    loss_spike_factor: float = 0.0
    """Skip a step whose loss exceeds this factor times the running median of the last 100
    accepted losses (after 10 steps); 0 disables, else > 1."""
    exit_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals after which every rank finishes the current step, saves and exits 0."""
    exit_duration_minutes: float = 0.0
    """Wall-clock limit: finish the step, save and exit 0 once this long has passed since the
    loop started; 0 disables."""
    hang_timeout_minutes: float = 20.0
    """Watchdog: with no step (or eval iteration, or save) finished for this long, print every
    rank's Python stacks and exit 4 (torchrun can relaunch); 0 disables."""

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"unknown precision {self.precision!r}", key="train.precision")
        check_at_least(self, "train", 1, ("seq_length", "micro_batch_size", "global_batch_size",
                                          "train_iters", "log_interval", "eval_iters"))
        check_at_least(self, "train", 0, ("eval_interval", "exit_at_step"))
        if isinstance(self.loss_chunk_tokens, str) and self.loss_chunk_tokens != "auto":
            raise ConfigError(f"expected auto or an int >= 0, got {self.loss_chunk_tokens!r}",
                              key="train.loss_chunk_tokens")
        if isinstance(self.loss_chunk_tokens, int) and self.loss_chunk_tokens < 0:
            raise ConfigError("must be >= 0 (0: Megatron's unchunked loss)", key="train.loss_chunk_tokens")
        self.recompute = normalize_recompute(self.recompute)
        self._check_safety()

    def resolved_loss_chunk_tokens(self, tp: int, device_type: str) -> int:
        """``loss_chunk_tokens`` with ``auto`` resolved for this run: 0 means Megatron's loss."""
        if self.loss_chunk_tokens != "auto":
            return self.loss_chunk_tokens
        return LOSS_CHUNK_AUTO_TOKENS if device_type == "cuda" and tp == 1 else 0

    def _check_safety(self) -> None:
        if self.max_skipped_steps < 1:
            raise ConfigError("must be >= 1", key="train.max_skipped_steps")
        if self.loss_spike_factor != 0 and not self.loss_spike_factor > 1:
            raise ConfigError("must be 0 (off) or > 1", key="train.loss_spike_factor")
        for name in ("exit_duration_minutes", "hang_timeout_minutes"):
            if not getattr(self, name) >= 0:
                raise ConfigError("must be >= 0 (0 disables)", key=f"train.{name}")
        for name in self.exit_signals:
            if name not in CATCHABLE_SIGNALS:
                raise ConfigError(f"unknown or uncatchable signal {name!r}; e.g. SIGTERM, "
                                  "SIGUSR1, SIGUSR2, SIGINT", key="train.exit_signals")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_iters: int = 2
    decay_iters: int = 0
    """Steps of cosine decay after warm-up; 0 means train_iters."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    distributed_optimizer: bool = True

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError("need 0 <= min_lr <= lr and lr > 0", key="optim.lr")
        check_at_least(self, "optim", 0, ("warmup_iters", "decay_iters", "weight_decay",
                                          "clip_grad"))
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"need 0 <= {name} < 1, got {getattr(self, name)}",
                                  key=f"optim.{name}")
        if not self.adam_eps > 0:
            raise ConfigError("must be > 0", key="optim.adam_eps")


@dataclass
class DataConfig:
    """Where tokens come from."""

    kind: str = "synthetic"
    """``synthetic`` (random tokens, for tests and benchmarks) or ``indexed`` (Megatron .bin/.idx)."""
    paths: list[str] = field(default_factory=list)
    """Indexed dataset prefixes (path without .bin/.idx)."""
    weights: list[float] = field(default_factory=list)
    """Blend weights, one per path; empty means equal."""
    split: str = "98,2,0"
    """Train/valid/test split of each dataset, Megatron style."""
    tokenizer: str = ""
    """Local tokenizer file (tokenizer.json) or directory; needed for ``indexed`` data."""
    cache_dir: str = ""
    """Where GPTDataset index caches go; empty means beside the run directory."""
    document_mask: bool = False
    """Packed documents: attention and the GLA state stop at EOD tokens (the tokenizer's EOD
    id; token 0 for synthetic data). Off matches SpikingBrain's published training path."""
    start_tokens: int = -1
    """Where in the training sample stream this run starts, in tokens (the first sample is
    ceil(start_tokens / seq_length)). -1 (default): 0, and in a staged config the tokens all
    earlier stages train on, so stage k continues the stream instead of re-reading stage
    k-1's samples; a stage that sets 0 starts over."""

    def __post_init__(self) -> None:
        if self.kind not in ("synthetic", "indexed"):
            raise ConfigError(f"unknown data kind {self.kind!r}", key="data.kind")
        if self.weights and len(self.weights) != len(self.paths):
            raise ConfigError("need one weight per path", key="data.weights")
        if self.start_tokens < -1:
            raise ConfigError("must be >= 0 (or -1: after the earlier stages)",
                              key="data.start_tokens")

    def first_sample(self, seq_length: int) -> int:
        """Index of this run's first training sample (see ``start_tokens``)."""
        return -(-max(self.start_tokens, 0) // seq_length)


@dataclass
class CheckpointConfig:
    """Megatron dist_checkpointing save and resume."""

    save_dir: str = ""
    """Empty disables saving."""
    save_interval: int = 0
    """Save every this many steps (and at the end); 0 saves only at the end when save_dir is set."""
    load_dir: str = ""
    """Resume from the latest checkpoint here; empty means save_dir if it has one."""
    load_optimizer: bool = True
    """Restore optimizer and scheduler state (False: weights only, a fresh optimizer)."""
    pretrained: str = ""
    """Initial weights when there is nothing to resume (e.g. ``sbtrain convert`` output):
    loaded weights-only at step 0 under any layout; a relaunch resumes from save_dir instead."""
    keep_last: int = 0
    """Delete older checkpoints beyond this many; 0 keeps all."""
    async_save: bool = False
    """Write the shards in a background process (megatron-core's async save) while training
    goes on; the save is committed (``iter_N``, ``latest``, pruning) once every rank's writer is
    done, at the latest before the next save and at the end of the run."""
    fully_parallel_save: bool = True
    """Spread the writing of data-parallel replicated shards over the data-parallel ranks
    (megatron-core's FullyParallelSaveStrategyWrapper) instead of the first replica's rank."""

    def __post_init__(self) -> None:
        check_at_least(self, "checkpoint", 0, ("save_interval", "keep_last"))


@dataclass
class ProfilerConfig:
    """MFU/TGS accounting, experiment tracking and traces."""

    peak_flops: float = 0.0
    """Dense bf16 peak per device in FLOP/s; 0 means the platform's table value."""
    summary_file: str = "profile.json"
    """Written into the run directory at the end of training."""
    device_memory_gib: float = 0.0
    """Device memory ``train.recompute: auto`` plans against; 0 means the device's own size at
    train start (``sbtrain plan``: the largest ``--device-gib``, else 80)."""

    tensorboard: bool = False
    """Also log every metrics.jsonl record to TensorBoard in ``RUN_DIR/tensorboard`` (needs the
    optional ``tensorboard`` package)."""
    wandb: bool = False
    """Also log every metrics.jsonl record and the resolved config to Weights & Biases (needs
    the optional ``wandb`` package)."""
    wandb_project: str = "sbtrain"
    """W&B project; the W&B run is named after the run directory."""
    wandb_mode: str = "offline"
    """offline (no network; ``wandb sync`` later) | online | disabled."""
    trace_steps: list[int] = field(default_factory=list)
    """``[a, b]``: a per-rank torch.profiler trace of steps a..b (counted from 1) into
    ``RUN_DIR/traces``; empty: none."""
    memory_snapshot: bool = False
    """Record the CUDA allocator's history and dump it to ``RUN_DIR/memory`` on an
    out-of-memory error and at the end (a note and nothing on CPU)."""

    def __post_init__(self) -> None:
        if self.device_memory_gib < 0:
            raise ConfigError("must be >= 0 (0: the device's size)",
                              key="profiler.device_memory_gib")
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"must be one of {WANDB_MODES}, got {self.wandb_mode!r}",
                              key="profiler.wandb_mode")
        steps = self.trace_steps
        if steps and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
            raise ConfigError(f"must be [first, last] with 1 <= first <= last, got {steps}",
                              key="profiler.trace_steps")


WANDB_MODES = ("offline", "online", "disabled")

# spiking.weight_quant value -> INT8 group size along the input dim (0: float weights).
WEIGHT_QUANT = {"none": 0, "int8_g128": 128}


@dataclass
class SpikingConfig:
    """SpikingBrain's adaptive-threshold neuron on the inputs of every linear projection.

    ``enabled`` plus ``weight_quant: int8_g128`` is SpikingBrain's W8ASpike evaluation mode:
    spiking activations and INT8 weights (``sbtrain spikestats``, or its ``--w8aspike``).
    """

    enabled: bool = False
    k: float = 3.0
    """V_th = mean(|x|) / k per token: a larger k gives a lower threshold and more spikes."""
    vth_min: float = 1e-5
    """Clamp of V_th (the official code's bounds), so an all-zero token gives zero spikes."""
    vth_max: float = 1e4
    weight_quant: str = "none"
    """Evaluation only: ``int8_g128`` fake-quantises the weights of every projection the
    neuron spikes to symmetric INT8, one scale (max|w| / 127) per output row and group of 128
    input columns (``sbtrain.spiking.quant``); embeddings, LM head, router and norms stay
    float. Needs ``enabled``; ``sbtrain train`` refuses it (training keeps float weights)."""

    def __post_init__(self) -> None:
        if self.k <= 0:
            raise ConfigError("must be > 0", key="spiking.k")
        if not 0 < self.vth_min <= self.vth_max:
            raise ConfigError("need 0 < vth_min <= vth_max", key="spiking.vth_min")
        if self.weight_quant not in WEIGHT_QUANT:
            raise ConfigError(f"unknown weight quantisation {self.weight_quant!r}; known: "
                              f"{', '.join(WEIGHT_QUANT)}", key="spiking.weight_quant")
        if self.weight_quant != "none" and not self.enabled:
            raise ConfigError("quantises the projections the neuron spikes; it needs "
                              "spiking.enabled: true", key="spiking.weight_quant")


@dataclass
class RunConfig:
    """The whole run: one section per component."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)
    spiking: SpikingConfig = field(default_factory=SpikingConfig)

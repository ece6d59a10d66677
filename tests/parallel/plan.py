"""Every training run the parity tests compare, grouped by world size: one launch per group.

A launch costs seconds of imports per rank; a tiny run a second of training. So the runs below
are trained together, one torchrun launch per world size per test session (the ``planned``
fixture in ``tests/conftest.py``, ``tests/parallel/multi_run.py``), and the tests read their
curves from there. Names are ``<shape>.<layout>``; values are config overrides of the harness's
TINY config. ``{tmp}`` in a string value is the launch's temporary directory (checkpoints).

Runs that resume from a checkpoint saved by an earlier run of the same group resume inside the
same processes; tests/parallel/test_checkpoint.py::test_resume_is_exact keeps one resume in a
fresh launch.
"""

from __future__ import annotations

MOE_PATTERN = "*-*E*-*E"
STEPS = {"train.train_iters": 4, "optim.decay_iters": 4}
# The 7B-style hybrid (GLA + sliding window 4 < seq 16) with packed-document masking.
HYBRID = {"model.pattern": "L-W-L-W-", "model.sliding_window": 4, "data.document_mask": True,
          "model.vocab_size": 16}
# The tiny SpikingBrain-76B shape: 4 layers so that pp 2 puts the sinks' positions across a
# stage boundary; window 4 < seq 16; packed documents masked; dense FFNs first, MoE after.
SHAPE_76B = {"model.pattern": "H-F-HEFE", "model.sliding_window": 4, "model.sink_tokens": 4,
             "data.document_mask": True, "model.vocab_size": 16}
SPIKING_HYBRID = {"model.pattern": "L-W-L-W-", "model.sliding_window": 4, "spiking.enabled": True}
SPIKING_MOE = {"model.pattern": "L-WE", "spiking.enabled": True}

SHAPES = {"dense": {}, "moe": {"model.pattern": MOE_PATTERN}, "7b": HYBRID, "76b": SHAPE_76B,
          "spiking": SPIKING_HYBRID, "spiking_moe": SPIKING_MOE,
          "spiking_off": {**SPIKING_HYBRID, "spiking.enabled": False}}

# (shape, layout) -> (ranks, overrides on top of the shape)
LAYOUTS = {
    ("dense", "dp2"): (2, {"parallel.pp": 1}),
    ("dense", "pp2"): (2, {"parallel.pp": 2}),
    ("dense", "tp2"): (2, {"parallel.tp": 2}),
    ("dense", "dp2_pp2"): (4, {"parallel.pp": 2}),
    ("moe", "ep2"): (2, {"parallel.ep": 2}),
    ("moe", "pp2_ep2"): (4, {"parallel.pp": 2, "parallel.ep": 2}),
    ("7b", "dp2"): (2, {}),
    ("7b", "pp2"): (2, {"parallel.pp": 2}),
    ("7b", "tp2"): (2, {"parallel.tp": 2}),
    # Megatron carves EP out of DP: ep2 = dp 2 (2 of 4 experts each); dp2_ep2 = dp 4 (two
    # expert-parallel pairs); pp2_ep2 = pp 2, dp 2, ep 2.
    ("76b", "ep2"): (2, {"parallel.ep": 2}),
    ("76b", "dp2_ep2"): (4, {"parallel.ep": 2}),
    ("76b", "pp2_ep2"): (4, {"parallel.pp": 2, "parallel.ep": 2}),
    # sequence parallelism: 16 tokens split 8/8 or 4/4/4/4 (slices shorter than the window
    # only at SP4), documents crossing slice boundaries, sinks replicated on every rank;
    # 7B SP2xDP2 and 76B SP4 with the chunked loss (5 tokens per chunk: chunks that do not
    # divide the 8-token slices).
    ("7b", "sp4"): (4, {"parallel.sp": 4}),
    ("7b", "sp2_dp2"): (4, {"parallel.sp": 2, "train.loss_chunk_tokens": 5}),
    ("7b", "sp2_pp2"): (4, {"parallel.sp": 2, "parallel.pp": 2}),
    ("76b", "sp2_ep2"): (2, {"parallel.sp": 2, "parallel.ep": 2}),
    # the send/recv halo (parallel.sp_softmax_exchange): H layers' window 4 <= the 8-token
    # slices takes it, F layers (full attention) keep the all-gather
    ("76b", "sp2_ep2_halo"): (2, {"parallel.sp": 2, "parallel.ep": 2,
                                  "parallel.sp_softmax_exchange": "halo"}),
    # Ulysses (all-to-all over heads) in every softmax branch, H (window 4) and F (full), with
    # the sinks and documents: 4 heads and 2 kv heads split over sp 2
    ("76b", "sp2_ep2_ulysses"): (2, {"parallel.sp": 2, "parallel.ep": 2,
                                     "parallel.sp_softmax_exchange": "ulysses"}),
    ("76b", "sp4"): (4, {"parallel.sp": 4, "train.loss_chunk_tokens": 5}),
    ("76b", "sp2_dp2"): (4, {"parallel.sp": 2}),
    ("76b", "sp2_pp2"): (4, {"parallel.sp": 2, "parallel.pp": 2}),
    # the neuron inside the model: TP2 (row-parallel inputs sum |x| over the TP group), PP2,
    # EP2 and DP2 (firing statistics summed over all ranks)
    ("spiking", "tp2"): (2, {"parallel.tp": 2}),
    ("spiking", "pp2"): (2, {"parallel.pp": 2}),
    ("spiking", "dp2"): (2, {}),
    ("spiking_moe", "ep2"): (2, {"parallel.ep": 2}),
}


# Megatron's bucketed overlap of the data-parallel reduce-scatter with backward and of the
# parameter all-gather with the next forward (parallel.overlap_*, on by default on GPUs only),
# with buckets of 3000 elements so that the tiny models have several buckets (a bucket whose
# gather nobody waits for would keep stale shards): the 7B hybrid under DP2 with the chunked
# loss (its output weight is used outside the output layer's forward), the 76B under DP2xEP2
# (grouped experts: their linears' forwards are never called) with an evaluation and a
# resume in between (both gather every bucket first).
OVERLAP = {"parallel.overlap_grad_reduce": True, "parallel.overlap_param_gather": True,
           "parallel.bucket_size": 3000}
OVERLAP_RUNS = {
    "7b.dp2_overlap": (2, {**HYBRID, **OVERLAP, "train.loss_chunk_tokens": 5}),
    "76b.ep2_overlap": (2, {**SHAPE_76B, **OVERLAP, "parallel.ep": 2,
                           "train.eval_interval": 2, "train.eval_iters": 1}),
}


def _resume(name: str, nproc: int, common: dict, first: dict, second: dict) -> dict:
    """An uninterrupted 4-step run and the same run stopped after step 2 then resumed
    (``<name>.full``, ``<name>.a``, ``<name>.b``), all on ``nproc`` ranks."""
    save = {"checkpoint.save_dir": f"{{tmp}}/{name}_ckpt"}
    return {f"{name}.full": (nproc, {**STEPS, **common}),
            f"{name}.a": (nproc, {**STEPS, **common, **first, **save, "train.exit_at_step": 2}),
            f"{name}.b": (nproc, {**STEPS, **common, **second, **save})}


# Resume == the uninterrupted run, inside one launch (the ``.full`` curve of a reshard is the
# one-process ``steps`` baseline).
RESUMES = {
    **_resume("resume_76b_ep2", 2, {**SHAPE_76B, "parallel.ep": 2}, {}, {}),
    **_resume("resume_76b_sp2", 2, {**SHAPE_76B, "parallel.sp": 2}, {}, {}),
    **{k: v for k, v in _resume("reshard_dp2_pp2", 2, {}, {}, {"parallel.pp": 2}).items()
       if not k.endswith(".full")},
    # saved under PP2xEP2 on 4 ranks, resumed under EP2 on 2 (== resume_76b_ep2.full): the
    # 2-rank launch reads the 4-rank launch's directory, {tmp4} (LAUNCH_AFTER)
    "reshard_76b_4to2.a": (4, {**STEPS, **SHAPE_76B, "parallel.pp": 2, "parallel.ep": 2,
                               "checkpoint.save_dir": "{tmp}/reshard_76b_4to2_ckpt",
                               "train.exit_at_step": 2}),
    "reshard_76b_4to2.b": (2, {**STEPS, **SHAPE_76B, "parallel.ep": 2,
                               "checkpoint.save_dir": "{tmp4}/reshard_76b_4to2_ckpt"}),
    # overlapped, stopped and resumed == resume_76b_ep2.full (not overlapped, uninterrupted)
    **{k: v for k, v in _resume("resume_76b_ep2_overlap", 2,
                                {**SHAPE_76B, **OVERLAP, "parallel.ep": 2}, {}, {}).items()
       if not k.endswith(".full")},
}


LAUNCH_AFTER = {2: (4,)}
"""Launches that read an earlier launch's checkpoints (``{tmp<ranks>}`` in a value) run after it."""


def with_launch_dirs(runs: dict[str, dict], directories: dict[int, object]) -> dict[str, dict]:
    """``runs`` with ``{tmp<ranks>}`` replaced by that launch's directory."""
    def fill(value):
        if not isinstance(value, str):
            return value
        for ranks, directory in directories.items():
            value = value.replace(f"{{tmp{ranks}}}", str(directory))
        return value

    return {name: {k: fill(v) for k, v in overrides.items()} for name, overrides in runs.items()}


def plan() -> dict[int, dict[str, dict]]:
    """``{ranks: {run name: overrides}}``: what each launch trains, in order."""
    groups: dict[int, dict[str, dict]] = {1: {}, 2: {}, 4: {}}
    for shape, overrides in SHAPES.items():
        groups[1][shape] = overrides
    groups[1]["steps"] = STEPS
    for (shape, layout), (nproc, overrides) in LAYOUTS.items():
        groups[nproc][f"{shape}.{layout}"] = {**SHAPES[shape], **overrides}
    for name, (nproc, overrides) in {**OVERLAP_RUNS, **RESUMES}.items():
        groups[nproc][name] = overrides
    return groups

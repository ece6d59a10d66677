"""Runs under torchrun (2 CPU ranks): several short trainings of one tiny config in one launch.

``python -m torch.distributed.run --nproc_per_node=2 nonfinite_runs.py CONFIG OUT.json``

* ``reference``: DP2, the data stream never contains batch POISON_STEP (it moves on to the next).
* ``dp2_nan_loss``: DP2, rank 1's activations are NaN at POISON_STEP (its loss and gradients).
* ``pp2_nan_grad``: PP2, one gradient of stage 0 (rank 0) is NaN at POISON_STEP; loss finite.
* ``diverged``: DP2, rank 1 is poisoned at every step from POISON_STEP; the run must stop.

Each rank checks that the weights after the poisoned step equal those before and that all
weights stay finite; the last rank writes every run's records to OUT.json.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from parallel.groups import destroy_parallel_groups
from sbtrain.config import load_config
from sbtrain.safety import TrainingDiverged
from sbtrain.trainer import Trainer

POISON_STEP = 1
"""0-based index of the poisoned step (its records carry step POISON_STEP + 1)."""


class PoisonedTrainer(Trainer):
    """Makes one rank's activations or gradients NaN at the chosen steps."""

    def __init__(self, cfg, rank: int, where: str, steps: set[int]) -> None:
        super().__init__(cfg)
        self.poison_rank, self.where, self.poison_steps = rank, where, steps
        self.poison_now = False
        self.weights: dict[int, torch.Tensor] = {}

    def setup(self):
        state = super().setup()
        gpt = state.model.module
        if self.where == "activations" and dist.get_rank() == self.poison_rank:
            gpt.embedding.register_forward_hook(
                lambda mod, inp, out: out * float("nan") if self.poison_now else None)
        if self.where == "gradients" and dist.get_rank() == self.poison_rank:
            param = next(gpt.parameters())
            param.register_hook(lambda g: g * float("nan") if self.poison_now else g)
        return state

    def train_step(self, step, stop=None):
        self.poison_now = step in self.poison_steps
        self.weights[step] = _flat_weights(self.state.model)
        result = super().train_step(step, stop)
        self.weights[step + 1] = _flat_weights(self.state.model)
        return result


class DroppedBatchTrainer(Trainer):
    """The reference: the data of step i >= POISON_STEP is the data of step i + 1."""

    def _device_batches(self, step, split):
        if split == "train" and step >= POISON_STEP:
            step += 1
        return super()._device_batches(step, split)


def _flat_weights(model) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in model.parameters()]).clone()


def _train(trainer: Trainer) -> dict:
    trainer.setup()
    out = {"error": ""}
    try:
        out["records"] = trainer.train()
    except TrainingDiverged as exc:
        out["error"] = str(exc)
    out["finite"] = bool(torch.isfinite(_flat_weights(trainer.state.model)).all())
    if isinstance(trainer, PoisonedTrainer):
        out["unchanged"] = bool(torch.equal(trainer.weights[POISON_STEP],
                                            trainer.weights[POISON_STEP + 1]))
        out["moved_before"] = not torch.equal(trainer.weights[0], trainer.weights[POISON_STEP])
    destroy_parallel_groups(keep_default_group=True)
    return out


def main(config: str, out_path: str) -> None:
    def cfg(name: str, *overrides: str):
        return load_config(config, [f"train.run_dir={base_run}/{name}", *overrides])

    base_run = load_config(config).train.run_dir
    iters = load_config(config).train.train_iters
    results = {
        # one step fewer, over the same data and LR schedule
        "reference": _train(DroppedBatchTrainer(cfg("reference",
                                                    f"train.exit_at_step={iters - 1}"))),
        "dp2_nan_loss": _train(PoisonedTrainer(cfg("dp2"), 1, "activations", {POISON_STEP})),
        "pp2_nan_grad": _train(PoisonedTrainer(cfg("pp2", "parallel.pp=2"), 0, "gradients",
                                               {POISON_STEP})),
        "diverged": _train(PoisonedTrainer(
            cfg("diverged", "train.max_skipped_steps=2", f"checkpoint.save_dir={base_run}/ck",
                "checkpoint.save_interval=1"), 1, "activations", set(range(POISON_STEP, iters)))),
    }
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {k: {x: v[x] for x in ("finite", "unchanged", "moved_before")
                                          if x in v} for k, v in results.items()})
    if dist.get_rank() == dist.get_world_size() - 1:
        results["per_rank"] = per_rank
        with open(out_path, "w") as f:
            json.dump(results, f)
    destroy_parallel_groups()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

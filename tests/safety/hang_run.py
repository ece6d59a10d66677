"""``sbtrain train`` under torchrun, except that rank 0 sleeps inside step 2 (a stuck rank)."""

from __future__ import annotations

import sys
import time

import torch.distributed as dist

from sbtrain.train import main
from sbtrain.trainer import Trainer

_train_step = Trainer.train_step


def stuck_train_step(self, step, stop=None):
    if step == 1 and dist.get_rank() == 0:
        time.sleep(120)
    return _train_step(self, step, stop)


if __name__ == "__main__":
    Trainer.train_step = stuck_train_step
    sys.exit(main(sys.argv[1:]))

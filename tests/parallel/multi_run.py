"""Several training runs in one torchrun launch (the harness's ``run_many``).

``python -m torch.distributed.run --nproc_per_node=N tests/parallel/multi_run.py CONFIG...``

Each CONFIG is a whole run (``sbtrain train CONFIG``), trained in order on the same ranks: the
model-parallel groups are rebuilt per run (as ``--stage all`` does), the default group is kept.
A launch costs ~5 s of imports per rank on the 2-core CI machine, a tiny run well under a
second of training, so the parity checks that share a world size share a launch. A later
config may resume from the checkpoint an earlier one saved (a resume inside one process: the
model, optimizer and data iterators are rebuilt from the checkpoint, seeds are set per run).
"""

from __future__ import annotations

import gc
import sys

from parallel.groups import destroy_parallel_groups
from sbtrain.config import load_config
from sbtrain.trainer import Trainer


def main(configs: list[str]) -> None:
    try:
        for path in configs:
            trainer = Trainer(load_config(path), source=path)
            trainer.setup()
            trainer.train()
            del trainer
            gc.collect()
            destroy_parallel_groups(keep_default_group=True)
    finally:
        destroy_parallel_groups()


if __name__ == "__main__":
    main(sys.argv[1:])

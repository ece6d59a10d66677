"""Split each global batch over data-parallel ranks and into micro-batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def microbatches(dataset: Sequence, step: int, global_batch: int, micro_batch: int, dp_rank: int,
                 dp_size: int, first_sample: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Yield this rank's micro-batches of optimizer step ``step`` (0-based).

    Global batch ``step`` is samples [F + step*G, F + (step+1)*G) with F = ``first_sample``
    (wrapping around the dataset); rank r takes the r-th contiguous 1/dp of it. Any layout
    therefore sees the same global batch.
    """
    per_rank = global_batch // dp_size
    start = first_sample + step * global_batch + dp_rank * per_rank
    for first in range(start, start + per_rank, micro_batch):
        samples = [dataset[i % len(dataset)] for i in range(first, first + micro_batch)]
        yield {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
               for key in ("tokens", "labels", "loss_mask", "position_ids")}

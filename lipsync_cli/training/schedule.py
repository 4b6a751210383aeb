"""What each optimiser step sees, as pure functions of the step: its learning rate and its samples.

Because both depend on the step alone, resuming needs only the step, and one process at batch B x world sees
exactly the samples that `world` processes at batch B see together.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler


def lr_at(step: int, lr: float, warmup: int, horizon: int | None, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to lr * min_ratio at `horizon` (flat without one)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if not horizon or horizon <= warmup:
        return lr
    t = min(1.0, (step - warmup) / (horizon - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


class StepBatches(Sampler[list[int]]):
    """This process's micro-batches, forever, starting at optimiser step `start`.

    Epoch e is a permutation seeded by seed + e; each step takes the next batch x accumulate x world indices of it
    and process r gets every world-th one. Each epoch drops its last incomplete step.
    """

    def __init__(self, n: int, batch: int, accumulate: int, world: int, rank: int, seed: int, start: int = 0):
        self.n, self.batch, self.accumulate, self.world, self.rank = n, batch, accumulate, world, rank
        self.seed, self.start = seed, start
        self.steps_per_epoch = n // (batch * accumulate * world)

    def __iter__(self):
        step = self.start
        while True:
            epoch, first = divmod(step, self.steps_per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            mine = perm[self.rank :: self.world]
            for s in range(first, self.steps_per_epoch):
                for k in range(self.accumulate):
                    i = (s * self.accumulate + k) * self.batch
                    yield mine[i : i + self.batch].tolist()
            step = (epoch + 1) * self.steps_per_epoch

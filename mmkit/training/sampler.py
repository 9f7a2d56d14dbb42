"""Which samples each process trains on, step by step.

A *global batch* (one optimizer step) holds ``micro_batch_size x grad_accum x world_size``
samples. The order of samples is drawn once per epoch from the seed, independently of the number
of processes; each global batch is then cut into ``grad_accum x world_size`` micro-batches, and
process ``r`` takes micro-batches ``r*grad_accum ... (r+1)*grad_accum - 1``. So a run on 2
processes trains on exactly the same global batches as a run on 1 process with twice the
``grad_accum``, and the data position of a run is a single number: the optimizer steps done.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from mmkit.errors import ConfigError


def batch_geometry(*, micro_batch_size: int, grad_accum: int, global_batch_size: int | None,
                   world_size: int) -> tuple[int, int]:
    """``(grad_accum, global_batch_size)`` for this many processes.

    With ``global_batch_size`` set, ``grad_accum`` is derived from it (so the global batch, and the
    loss curve, stay the same whatever the number of processes); otherwise the global batch is
    ``micro_batch_size x grad_accum x world_size``.
    """
    if micro_batch_size < 1:
        raise ConfigError(f"micro_batch_size {micro_batch_size}: must be at least 1")
    if global_batch_size is None:
        if grad_accum < 1:
            raise ConfigError(f"grad_accum {grad_accum}: must be at least 1")
        return grad_accum, micro_batch_size * grad_accum * world_size
    per_step = micro_batch_size * world_size
    if global_batch_size < per_step or global_batch_size % per_step:
        raise ConfigError(f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size "
                          f"{micro_batch_size} x {world_size} process(es) = {per_step}: change "
                          "global_batch_size, micro_batch_size or the number of processes")
    return global_batch_size // per_step, global_batch_size


class GlobalBatchSampler:
    """A ``batch_sampler`` for :class:`torch.utils.data.DataLoader`: yields this process's
    micro-batches (lists of dataset indices) for the rest of the current epoch.

    The last global batch of an epoch is completed with samples from the start of the epoch's
    order (as :class:`~torch.utils.data.DistributedSampler` pads), so every process runs the same
    number of micro-batches and every sample is seen each epoch.
    """

    def __init__(self, num_samples: int, *, micro_batch_size: int, grad_accum: int, rank: int, world_size: int,
                 seed: int, shuffle: bool = True):
        if num_samples < 1:
            raise ConfigError("no training samples")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.global_batch_size = micro_batch_size * grad_accum * world_size
        self.steps_per_epoch = max(1, math.ceil(num_samples / self.global_batch_size))
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch ``epoch`` from its global step ``start_step`` (resume skips what was
        consumed without loading any of it)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside 0..{self.steps_per_epoch}")
        self.epoch = epoch
        self.start_step = start_step

    def epoch_order(self, epoch: int) -> list[int]:
        """Every global batch of ``epoch``, concatenated (padded to whole global batches)."""
        import torch

        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        else:
            order = list(range(self.num_samples))
        needed = self.steps_per_epoch * self.global_batch_size
        while len(order) < needed:
            order += order[: needed - len(order)]
        return order

    def global_batch(self, epoch: int, step: int) -> list[int]:
        """The indices of global step ``step`` (0-based within ``epoch``), all processes together."""
        g = self.global_batch_size
        return self.epoch_order(epoch)[step * g:(step + 1) * g]

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order(self.epoch)
        g, m = self.global_batch_size, self.micro_batch_size
        for step in range(self.start_step, self.steps_per_epoch):
            batch = order[step * g:(step + 1) * g]
            for a in range(self.grad_accum):
                j = self.rank * self.grad_accum + a
                yield batch[j * m:(j + 1) * m]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.grad_accum

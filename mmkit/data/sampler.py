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


class StepSampler:
    """A ``batch_sampler`` for :class:`torch.utils.data.DataLoader` that yields this process's
    micro-batches (lists of dataset indices) for the rest of the current epoch.

    Subclasses say how an epoch is cut into micro-batches (:meth:`plan`, the same list on every
    process); this class owns the step geometry: global step ``s`` is micro-batches
    ``s*G ... (s+1)*G - 1`` (``G = grad_accum x world_size``) and process ``r`` runs micro-batches
    ``r*grad_accum ... (r+1)*grad_accum - 1`` of it. A last, incomplete step is completed with
    micro-batches from the start of the epoch, so every process runs the same number.
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
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.global_batch_size = micro_batch_size * grad_accum * world_size
        self.epoch = 0
        self.start_step = 0
        self._plans: dict[int, list[list[int]]] = {}

    def plan(self, epoch: int) -> list[list[int]]:  # pragma: no cover - interface
        raise NotImplementedError

    def micro_batches(self, epoch: int) -> list[list[int]]:
        """Every micro-batch of ``epoch``, all processes together (cached for the last two epochs)."""
        key = epoch if self.shuffle else 0
        if key not in self._plans:
            self._plans = {k: v for k, v in self._plans.items() if k >= key - 1}
            self._plans[key] = self.plan(key)
        return self._plans[key]

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.micro_batches(self.epoch)) / (self.grad_accum * self.world_size)))

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch ``epoch`` from its global step ``start_step`` (resume skips what was
        consumed without loading any of it)."""
        self.epoch = epoch
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside 0..{self.steps_per_epoch}")
        self.start_step = start_step

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.micro_batches(self.epoch)
        per_step = self.grad_accum * self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            for a in range(self.grad_accum):
                yield batches[(step * per_step + self.rank * self.grad_accum + a) % len(batches)]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.grad_accum


class GlobalBatchSampler(StepSampler):
    """Random global batches: the epoch's order is drawn from the seed (as
    :class:`~torch.utils.data.DistributedSampler` draws it) and padded with samples from its start
    to whole global batches, so every sample is seen each epoch."""

    def plan(self, epoch: int) -> list[list[int]]:
        import torch

        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        else:
            order = list(range(self.num_samples))
        needed = math.ceil(self.num_samples / self.global_batch_size) * self.global_batch_size
        while len(order) < needed:
            order += order[: needed - len(order)]
        m = self.micro_batch_size
        return [order[i:i + m] for i in range(0, needed, m)]

"""The preprocessed cloud as one fixed-size float vector: the points, then each level's grouping.

Farthest-point sampling and kNN depend on the points alone, not on weights, so ``preprocess`` runs
them once per cloud (in the data-loader workers, or once into the feature cache) and the encoder's
forward only gathers. The item stays one fixed-shape float tensor, so the encoder remains a
fixed-size (contract 1.0) encoder that stacks, caches and blanks like any other::

    [ points: num_points x in_channels | index digits: digits x indices ]

``indices`` = the level-0 centres (FPS order, into the points), then per level ``l`` its
``centres[l] x neighbours[l]`` kNN indices (level 0 into the points, level ``l`` into level
``l-1``'s centres; level ``l``'s centres are the first ``centres[l]`` of level 0's, as FPS from
point 0 of an FPS-ordered prefix is that prefix). Each index is stored as base-256 digits, least
significant first: values 0..255 are exact in bfloat16 and float16, so the indices survive the cast
to the layers' dtype that mixed-precision training applies to every floating input.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor

from mmkit_plugin_pointcloud.config import PointNet2Config
from mmkit_plugin_pointcloud.sampling import farthest_point_sample, farthest_point_sample_single, gather_points, knn

BASE = 256


@dataclasses.dataclass(frozen=True)
class Grouping:
    """One batch's sampling and grouping: ``order`` ``[B, centres[0]]`` (level 0's centres, into the
    points) and per level ``neighbours[l]`` ``[B, centres[l], neighbours[l]]``."""

    order: Tensor
    neighbours: tuple[Tensor, ...]


def group(pos: Tensor, cfg: PointNet2Config) -> Grouping:
    """FPS centres and kNN groups of every level for ``pos`` ``[B, N, 3]`` (float32: the precision
    the encoder has always grouped at). Per cloud, so a batch groups exactly as its clouds alone."""
    pos = pos.float()
    if pos.device.type == "cpu" and pos.shape[0] == 1:  # preprocess: numpy's per-op cost is a fraction of torch's
        order = torch.from_numpy(farthest_point_sample_single(pos[0].numpy(), cfg.centres[0], dtype=np.float32))[None]
    else:  # a batch: one torch loop over all clouds at once
        order = farthest_point_sample(pos, cfg.centres[0])
    centre_pos = gather_points(pos, order)  # [B, centres[0], 3], FPS order
    neighbours, points = [], pos
    for m, k in zip(cfg.centres, cfg.neighbours):
        query = centre_pos[:, :m]
        neighbours.append(knn(query, points, k))
        points = query
    return Grouping(order, tuple(neighbours))


@dataclasses.dataclass(frozen=True)
class InputLayout:
    """Where the points and each index sit in the flat preprocessed vector of ``cfg``."""

    cfg: PointNet2Config

    @property
    def point_values(self) -> int:
        return self.cfg.num_points * self.cfg.in_channels

    @property
    def num_indices(self) -> int:
        return self.cfg.centres[0] + sum(m * k for m, k in zip(self.cfg.centres, self.cfg.neighbours))

    @property
    def digits(self) -> int:
        """Base-256 digits per index: enough for the largest, ``num_points - 1``."""
        digits, reach = 1, BASE
        while reach < self.cfg.num_points:
            digits, reach = digits + 1, reach * BASE
        return digits

    @property
    def size(self) -> int:
        return self.point_values + self.digits * self.num_indices

    def pack(self, points: Tensor, grouping: Grouping) -> Tensor:
        """``points`` ``[B, num_points, in_channels]`` and their grouping -> ``[B, size]`` float32."""
        batch = points.shape[0]
        index = torch.cat([grouping.order, *(n.reshape(batch, -1) for n in grouping.neighbours)], dim=1)
        digits = [(index // BASE**d) % BASE for d in range(self.digits)]
        return torch.cat([points.reshape(batch, -1).float(), *(d.float() for d in digits)], dim=1)

    def unpack(self, x: Tensor) -> tuple[Tensor, Grouping]:
        """``[B, size]`` -> points ``[B, num_points, in_channels]`` (in ``x``'s dtype) and the grouping.

        Indices are rounded and clamped into range: a vector ``preprocess`` made is unchanged by that,
        and a random one of the same shape (what throughput benchmarks feed) still encodes."""
        cfg, batch = self.cfg, x.shape[0]
        points = x[:, :self.point_values].reshape(batch, cfg.num_points, cfg.in_channels)
        digits = x[:, self.point_values:].float().round().clamp(0, BASE - 1).long().view(batch, self.digits, -1)
        index = sum(digits[:, d] * BASE**d for d in range(self.digits))
        order = index[:, :cfg.centres[0]].clamp(max=cfg.num_points - 1)
        neighbours, start, available = [], cfg.centres[0], cfg.num_points
        for m, k in zip(cfg.centres, cfg.neighbours):
            neighbours.append(index[:, start:start + m * k].reshape(batch, m, k).clamp(max=available - 1))
            start, available = start + m * k, m
        return points, Grouping(order, tuple(neighbours))

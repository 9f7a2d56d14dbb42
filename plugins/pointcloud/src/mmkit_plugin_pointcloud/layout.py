"""The preprocessed cloud: its points and each level's grouping, as typed tensors.

Farthest-point sampling and kNN depend on the points alone, not on weights, so ``preprocess`` runs
them once per cloud (in the data-loader workers, or once into the feature cache) and the encoder's
forward only gathers. The item is a :class:`GroupedCloud` (a NamedTuple: it pickles to loader
workers, and mmkit's ``move`` casts only its floating leaf, the points, so the int64 indices stay
exact under bf16/fp16); the encoder's ``collate`` stacks each field.

``centres`` = level 0's centres (FPS order, into the points); per level ``l`` its ``centres[l] x
neighbours[l]`` kNN indices (level 0 into the points, level ``l`` into level ``l-1``'s centres;
level ``l``'s centres are the first ``centres[l]`` of level 0's, as FPS from point 0 of an FPS-ordered
prefix is that prefix).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from mmkit_plugin_pointcloud.config import PointNet2Config
from mmkit_plugin_pointcloud.sampling import farthest_point_sample, farthest_point_sample_single, gather_points, knn


class GroupedCloud(NamedTuple):
    """One preprocessed cloud, or a collated batch of them (a leading batch dimension on every field):
    ``points`` ``[N, C]`` float32, ``centres`` ``[centres[0]]`` int64 and per level ``neighbours[l]``
    ``[centres[l], neighbours[l]]`` int64."""

    points: Tensor
    centres: Tensor
    neighbours: tuple[Tensor, ...]


def group(points: Tensor, cfg: PointNet2Config) -> GroupedCloud:
    """``points`` ``[B, N, C]`` with the FPS centres and kNN groups of every level of their xyz (in
    float32: the precision the encoder has always grouped at). Per cloud, so a batch groups exactly as
    its clouds alone."""
    pos = points[..., :3].float()
    if pos.device.type == "cpu" and pos.shape[0] == 1:  # preprocess: numpy's per-op cost is a fraction of torch's
        order = torch.from_numpy(farthest_point_sample_single(pos[0].numpy(), cfg.centres[0], dtype=np.float32))[None]
    else:  # a batch: one torch loop over all clouds at once
        order = farthest_point_sample(pos, cfg.centres[0])
    centre_pos = gather_points(pos, order)  # [B, centres[0], 3], FPS order
    neighbours, source = [], pos
    for m, k in zip(cfg.centres, cfg.neighbours):
        query = centre_pos[:, :m]
        neighbours.append(knn(query, source, k))
        source = query
    return GroupedCloud(points, order, tuple(neighbours))


def blank(cfg: PointNet2Config, batch_size: int) -> GroupedCloud:
    """``batch_size`` all-zero clouds, grouped: every point coincides, so FPS picks point 0 throughout
    and any neighbour is the same point; index 0 everywhere is that grouping, without running it."""
    zeros = torch.zeros(batch_size, cfg.num_points, cfg.in_channels)
    return GroupedCloud(zeros, torch.zeros(batch_size, cfg.centres[0], dtype=torch.long),
                        tuple(torch.zeros(batch_size, m, k, dtype=torch.long) for m, k in zip(cfg.centres, cfg.neighbours)))


def collate(items: Sequence[GroupedCloud]) -> GroupedCloud:
    """Stack each field of single clouds; an item that is already a batch (``points`` ``[B, N, C]``,
    such as the evaluation ablation's ``blank(1)``) joins with its clouds in place."""
    if not items:
        raise ValueError("no point clouds to collate")
    bad = [type(item).__name__ for item in items if not isinstance(item, GroupedCloud)]
    if bad:
        raise TypeError(f"expected GroupedCloud items (the encoder's preprocess output), got {', '.join(sorted(set(bad)))}")
    batches = [item if item.points.dim() == 3 else _batch_of_one(item) for item in items]
    return GroupedCloud(torch.cat([b.points for b in batches]), torch.cat([b.centres for b in batches]),
                        tuple(torch.cat(level) for level in zip(*(b.neighbours for b in batches), strict=True)))


def _batch_of_one(item: GroupedCloud) -> GroupedCloud:
    return GroupedCloud(item.points[None], item.centres[None], tuple(n[None] for n in item.neighbours))


def check(batch: GroupedCloud, cfg: PointNet2Config) -> None:
    """Shapes and dtypes of a collated batch against ``cfg`` (a ValueError naming the field)."""
    size = batch.points.shape[0] if batch.points.dim() == 3 else None
    want = {"points": (size, cfg.num_points, cfg.in_channels), "centres": (size, cfg.centres[0])}
    got = {"points": batch.points, "centres": batch.centres}
    if len(batch.neighbours) != len(cfg.centres):
        raise ValueError(f"GroupedCloud has {len(batch.neighbours)} neighbour levels, the encoder {len(cfg.centres)}")
    for level, (m, k) in enumerate(zip(cfg.centres, cfg.neighbours)):
        want[f"neighbours[{level}]"] = (size, m, k)
        got[f"neighbours[{level}]"] = batch.neighbours[level]
    for name, tensor in got.items():
        if tuple(tensor.shape) != want[name]:
            raise ValueError(f"GroupedCloud {name} has shape {list(tensor.shape)}, expected "
                             f"[B, {', '.join(str(d) for d in want[name][1:])}] (a collated batch)")
        if name != "points" and tensor.is_floating_point():
            raise ValueError(f"GroupedCloud {name} is {tensor.dtype}, expected integer indices")

"""Farthest-point sampling, kNN and cloud normalisation: batched torch for the encoder, numpy for
one cloud's preprocessing.

torch-geometric's ``fps`` / ``knn`` need pyg-lib or torch-cluster (compiled extensions that often
fail to install, a known LAMM pain point), so these are written with ordinary tensor ops. Every
operation treats each batch item on its own (no batch-wide reductions, no matmul-based distances),
which makes results identical whether a cloud is encoded alone or in a batch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def farthest_point_sample(pos: Tensor, num_samples: int, start: int = 0) -> Tensor:
    """Indices ``[B, num_samples]`` of farthest-point samples of ``pos`` ``[B, N, D]``.

    Deterministic: starts at index ``start`` of every cloud, and ties go to the lowest index (the
    documented behaviour of ``argmax``), so duplicated points (padding) never change the result.
    """
    if pos.dim() != 3:
        raise ValueError(f"pos must be [B, N, D], got {tuple(pos.shape)}")
    batch, n, _ = pos.shape
    if not 0 < num_samples <= n:
        raise ValueError(f"cannot take {num_samples} samples from {n} points")
    if not 0 <= start < n:
        raise ValueError(f"start index {start} outside [0, {n})")
    pos = pos.float()
    coords = pos.permute(2, 0, 1).contiguous()  # [D, B, N]: one contiguous plane per coordinate
    index = torch.empty(batch, num_samples, dtype=torch.long, device=pos.device)
    nearest = torch.full((batch, n), float("inf"), device=pos.device)
    current = torch.full((batch,), start, dtype=torch.long, device=pos.device)
    rows = torch.arange(batch, device=pos.device)
    for i in range(num_samples):
        index[:, i] = current
        chosen = pos[rows, current]  # [B, D]
        dist = sum((plane - chosen[:, d, None]).square() for d, plane in enumerate(coords))
        nearest = torch.minimum(nearest, dist)
        current = nearest.argmax(dim=1)
    return index


def knn(query: Tensor, points: Tensor, k: int) -> Tensor:
    """Indices ``[B, M, k]`` of the ``k`` nearest ``points`` ``[B, N, D]`` to each ``query``
    ``[B, M, D]``, nearest first."""
    if k > points.shape[1]:
        raise ValueError(f"k={k} exceeds the {points.shape[1]} points available")
    # The direct (non-matmul) distance is exact per item: the matmul trick can differ in the last
    # bits between batch sizes and flip near-ties.
    dist = torch.cdist(query.float(), points.float(), compute_mode="donot_use_mm_for_euclid_dist")
    return dist.topk(k, dim=-1, largest=False, sorted=True).indices


def gather_points(values: Tensor, index: Tensor) -> Tensor:
    """``values[b, index[b, ...]]`` for ``values`` ``[B, N, C]`` and ``index`` ``[B, ...]``."""
    batch = values.shape[0]
    flat = index.reshape(batch, -1)
    out = values.gather(1, flat.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
    return out.reshape(*index.shape, values.shape[-1])


def normalise_cloud(xyz: np.ndarray) -> np.ndarray:
    """Centre ``[N, 3]`` coordinates at their centroid and scale them into the unit sphere (float64,
    so scene coordinates far from the origin keep their precision)."""
    xyz = np.asarray(xyz, dtype=np.float64)
    xyz = xyz - xyz.mean(axis=0, keepdims=True)
    radius = np.sqrt((xyz * xyz).sum(axis=1).max())
    if radius > 0:  # a single point (or all points equal) stays at the origin
        xyz = xyz / radius
    return xyz


def farthest_point_sample_single(points: np.ndarray, num_samples: int, start: int = 0,
                                 dtype: type = np.float64) -> np.ndarray:
    """Farthest-point sampling of one ``[N, D]`` cloud in numpy, for preprocessing.

    Same rule as :func:`farthest_point_sample` (start at ``start``, lowest index wins ties). The loop
    is sequential by nature; numpy with preallocated buffers has a fraction of torch's per-op
    overhead on a single cloud (about a second for 40,000 -> 8,192 points on one CPU core). With
    ``dtype=np.float32`` every operation is the one :func:`farthest_point_sample` does on float32
    points, in the same order, so the picks are bitwise the same.
    """
    n = points.shape[0]
    if not 0 < num_samples <= n:
        raise ValueError(f"cannot take {num_samples} samples from {n} points")
    if not 0 <= start < n:
        raise ValueError(f"start index {start} outside [0, {n})")
    planes = [np.ascontiguousarray(points[:, d], dtype=dtype) for d in range(points.shape[1])]
    index = np.empty(num_samples, dtype=np.int64)
    nearest = np.full(n, np.inf, dtype=dtype)
    dist, tmp = np.empty(n, dtype=dtype), np.empty(n, dtype=dtype)
    current = start
    for i in range(num_samples):
        index[i] = current
        dist.fill(0.0)
        for plane in planes:
            np.subtract(plane, plane[current], out=tmp)
            np.multiply(tmp, tmp, out=tmp)
            dist += tmp
        np.minimum(nearest, dist, out=nearest)
        current = int(nearest.argmax())
    return index


def resample(points: np.ndarray, num_points: int) -> np.ndarray:
    """Exactly ``num_points`` rows of ``points`` ``[N, C]``: farthest-point sampling on the xyz
    columns (from row 0) when there are more, cyclic repetition when there are fewer."""
    n = points.shape[0]
    if n > num_points:
        index = farthest_point_sample_single(points[:, :3], num_points)
    else:
        # Whole copies keep the cloud's density pattern; duplicates do not move max-pooled features.
        index = np.arange(num_points) % n
    return points[index]

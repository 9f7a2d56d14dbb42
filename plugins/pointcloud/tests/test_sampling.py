"""FPS, kNN and normalisation against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmkit_plugin_pointcloud.sampling import (
    farthest_point_sample,
    farthest_point_sample_single,
    gather_points,
    knn,
    normalise_cloud,
    resample,
)


def _fps_reference(points: np.ndarray, m: int, start: int = 0) -> list[int]:
    """Textbook FPS: each pick maximises the distance to the nearest point already picked."""
    dist = np.linalg.norm(points[:, None, :] - points[None, :, :], axis=-1)
    chosen = [start]
    while len(chosen) < m:
        nearest = dist[:, chosen].min(axis=1)
        chosen.append(int(np.argmax(nearest)))
    return chosen


@pytest.mark.parametrize("n,m", [(50, 10), (200, 64), (7, 7)])
def test_fps_matches_brute_force(n: int, m: int) -> None:
    rng = np.random.default_rng(n)
    clouds = rng.normal(size=(3, n, 3)).astype(np.float32)
    got = farthest_point_sample(torch.from_numpy(clouds), m)
    for b in range(3):
        assert got[b].tolist() == _fps_reference(clouds[b].astype(np.float64), m)
        assert farthest_point_sample_single(clouds[b], m).tolist() == _fps_reference(clouds[b].astype(np.float64), m)


def test_fps_start_index_and_batch_invariance() -> None:
    pos = torch.randn(4, 100, 3, generator=torch.Generator().manual_seed(0))
    batched = farthest_point_sample(pos, 20, start=5)
    assert (batched[:, 0] == 5).all()
    for b in range(4):
        assert torch.equal(batched[b], farthest_point_sample(pos[b:b + 1], 20, start=5)[0])


def test_fps_skips_duplicates_of_padded_clouds() -> None:
    base = torch.randn(10, 3, generator=torch.Generator().manual_seed(1))
    padded = base[torch.arange(32) % 10]
    picks = farthest_point_sample(padded[None], 10)[0]
    assert sorted((picks % 10).tolist()) == list(range(10))  # every distinct point once, no duplicate


def test_fps_rejects_bad_requests() -> None:
    with pytest.raises(ValueError):
        farthest_point_sample(torch.zeros(1, 5, 3), 6)
    with pytest.raises(ValueError):
        farthest_point_sample(torch.zeros(5, 3), 2)
    with pytest.raises(ValueError):
        farthest_point_sample_single(np.zeros((5, 3)), 2, start=5)


def test_knn_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(2)
    points = torch.randn(2, 80, 3, generator=gen)
    query = torch.randn(2, 12, 3, generator=gen)
    got = knn(query, points, 7)
    for b in range(2):
        dist = ((query[b, :, None, :] - points[b, None, :, :]) ** 2).sum(-1)
        expected = dist.argsort(dim=1)[:, :7]
        assert torch.equal(got[b], expected)
    assert torch.equal(got[1:], knn(query[1:], points[1:], 7))
    with pytest.raises(ValueError):
        knn(query, points, 81)


def test_gather_points() -> None:
    values = torch.arange(2 * 5 * 2, dtype=torch.float32).view(2, 5, 2)
    index = torch.tensor([[[4, 0]], [[1, 1]]])
    out = gather_points(values, index)
    assert out.shape == (2, 1, 2, 2)
    assert torch.equal(out[0, 0], values[0, [4, 0]]) and torch.equal(out[1, 0], values[1, [1, 1]])


def test_normalise_cloud() -> None:
    rng = np.random.default_rng(3)
    xyz = rng.normal(size=(100, 3)) * [5, 1, 0.1] + 1e6  # far from the origin: float64 keeps detail
    out = normalise_cloud(xyz)
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-9)
    assert np.isclose(np.linalg.norm(out, axis=1).max(), 1.0)
    np.testing.assert_array_equal(normalise_cloud(np.ones((4, 3))), np.zeros((4, 3)))


def test_resample_pads_and_subsamples() -> None:
    rng = np.random.default_rng(4)
    small = rng.normal(size=(5, 6))
    padded = resample(small, 12)
    np.testing.assert_array_equal(padded, small[np.arange(12) % 5])
    big = rng.normal(size=(300, 6))
    sub = resample(big, 64)
    assert sub.shape == (64, 6) and len({tuple(r) for r in sub.tolist()}) == 64
    np.testing.assert_array_equal(sub, big[_fps_reference(big[:, :3], 64)])
    np.testing.assert_array_equal(resample(big, 300), big)

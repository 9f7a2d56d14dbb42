"""Sampling and grouping moved from forward into preprocess: the features are bitwise those of the
encoder that grouped in every forward, the grouping (int64 indices in a GroupedCloud) survives the
mixed-precision cast, and runs recorded before the move still load (their identity is a legacy
identity of the same encoder)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import Tensor

from mmkit.modeling.features import move
from mmkit_plugin_pointcloud.config import DEMO, TINY
from mmkit_plugin_pointcloud.encoder import PointNet2Encoder, build_encoder
from mmkit_plugin_pointcloud.layout import GroupedCloud, group
from mmkit_plugin_pointcloud.sampling import farthest_point_sample, gather_points, knn
from mmkit_plugin_pointcloud.shapes import sample_shape


def grouped_every_step(enc: PointNet2Encoder, x: Tensor) -> Tensor:
    """The forward before the move (commit 5877eb2), verbatim but for the input check: FPS and kNN
    of the points ``[B, num_points, in_channels]`` in every call."""
    batch = x.shape[0]
    dtype = enc.feature_proj.weight.dtype
    pos = x[..., :3].float()
    feat = x[..., 3:].to(dtype) if x.shape[-1] > 3 else None
    if enc.cfg.invariant_features:
        radius = pos.norm(dim=-1, keepdim=True).to(dtype)
        feat = radius if feat is None else torch.cat([feat, radius], dim=-1)
    order = farthest_point_sample(pos, enc.cfg.centres[0])
    for level, conv in enumerate(enc.levels):
        m, k = enc.cfg.centres[level], enc.cfg.neighbours[level]
        n = pos.shape[1]
        centre_index = order[:, :m] if level == 0 else torch.arange(m, device=x.device).expand(batch, m)
        centre_pos = gather_points(pos, centre_index)
        neighbours = knn(centre_pos, pos, k)
        offsets = torch.arange(batch, device=x.device).view(batch, 1, 1)
        source = (neighbours + offsets * n).reshape(-1)
        target = torch.arange(batch * m, device=x.device).repeat_interleave(k)
        edge_index = torch.stack([source, target])
        flat_feat = feat.reshape(batch * n, -1) if feat is not None else None
        positions = (pos.reshape(batch * n, 3).to(dtype), centre_pos.reshape(batch * m, 3).to(dtype))
        out = conv((flat_feat, None), positions, edge_index)
        feat, pos = out.view(batch, m, -1), centre_pos
    where = torch.cat([pos, pos.norm(dim=-1, keepdim=True)], dim=-1) if enc.cfg.invariant_features else pos
    tokens = enc.feature_proj(feat) + enc.position_embed(where.to(dtype))
    if enc.transformer is not None:
        tokens = enc.transformer(tokens)
    return enc.norm(tokens)


def _clouds(colour: bool) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    # more points than num_points (FPS-subsampled), fewer (repeated: exact duplicates, kNN ties), a grid
    # of equal distances (ties), and the demo's solids
    sizes = {"sphere": 900, "cube": 120, "torus": 400, "cone": 256, "cylinder": 31}
    out = [sample_shape(name, rng, n) for name, n in sizes.items()]
    grid = np.stack(np.meshgrid(*[np.arange(7.0)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    out.append(grid)
    if colour:
        out = [np.concatenate([c, rng.random((len(c), 3))], axis=1) for c in out]
    return [c.astype(np.float32) for c in out]


@pytest.mark.parametrize("options", [
    TINY,
    {**TINY, **DEMO},
    {**TINY, "transformer_layers": 1, "num_heads": 4, "invariant_features": False},
    {**TINY, "num_points": 300, "centres": [96, 32, 8], "neighbours": [12, 8, 4], "widths": [16, 16, 16]},
])
def test_features_equal_the_per_step_grouping(options: dict) -> None:
    enc = build_encoder(**options).eval()
    clouds = _clouds(colour=enc.cfg.in_channels == 6)
    points = torch.stack([enc.prepare_points(c) for c in clouds])
    items = [enc.preprocess(c) for c in clouds]
    x = enc.collate(items)
    assert isinstance(x, GroupedCloud) and x.points.shape == (len(clouds), *points.shape[1:])
    with torch.no_grad():
        before = grouped_every_step(enc, points)
        assert torch.equal(enc(x), before)  # grouping precomputed per cloud, in the loader
        assert torch.equal(enc(points), before)  # bare points: grouped in forward, as a stock PointNet++
        assert torch.equal(enc.stock_input(x), points)
        assert torch.equal(enc(enc.collate(items[2:3])), before[2:3])
        # the blank pass (zeros) and the ablation encode as the old blank cloud did
        blank = grouped_every_step(enc, torch.zeros_like(points[:2]))
        assert torch.equal(enc(enc.blank_input(2)), blank)
        assert torch.equal(enc(group(torch.zeros_like(points[:2]), enc.cfg)), blank)


def test_integer_leaves_survive_the_move_to_bf16() -> None:
    """mmkit moves batches casting only floating leaves: the points take the layers' dtype, the
    indices stay int64 and exact (300 points: indices above 256, where bf16 would round them)."""
    enc = build_encoder(**{**TINY, "num_points": 300}).eval()
    x = enc.collate([enc.preprocess(c) for c in _clouds(colour=True)])
    assert int(x.neighbours[0].max()) > 256  # the test would not notice a lossy cast otherwise
    for dtype in (torch.bfloat16, torch.float16):
        moved = move(x, "cpu", dtype)
        assert isinstance(moved, GroupedCloud) and moved.points.dtype == dtype
        assert moved.centres.dtype == torch.long and torch.equal(moved.centres, x.centres)
        for got, want in zip(moved.neighbours, x.neighbours, strict=True):
            assert got.dtype == torch.long and torch.equal(got, want)
    with torch.no_grad():
        half = enc.to(torch.bfloat16)(move(x, "cpu", torch.bfloat16))
    assert half.dtype == torch.bfloat16 and half.isfinite().all()


def test_items_pickle_and_collate_with_a_blank_batch() -> None:
    """Loader workers pickle items; the evaluation ablation collates ``blank(1)`` among single clouds."""
    enc = build_encoder(**TINY).eval()
    item = enc.preprocess(_clouds(colour=True)[0])
    again = pickle.loads(pickle.dumps(item))
    assert isinstance(again, GroupedCloud) and torch.equal(again.points, item.points)
    assert all(torch.equal(a, b) for a, b in zip(again.neighbours, item.neighbours, strict=True))
    blank = enc.blank_item()
    assert isinstance(blank, GroupedCloud) and blank.points.shape == item.points.shape
    batch = enc.collate([blank, item, enc.blank(1)])  # a single blank cloud, or a collated batch of one
    with torch.no_grad():
        out = enc(batch)
        assert torch.equal(out[1:2], enc(enc.collate([item])))
        assert torch.equal(out[0], out[2]) and torch.equal(out[0:1], enc(enc.blank(1)))
    with pytest.raises(TypeError, match="expected GroupedCloud items"):
        enc.collate([item.points])


def test_a_batch_of_the_wrong_shape_is_a_clear_error() -> None:
    from mmkit.errors import PluginError

    enc = build_encoder(**TINY).eval()
    x = enc.collate([enc.preprocess(c) for c in _clouds(colour=True)[:2]])
    with pytest.raises(PluginError, match=r"GroupedCloud neighbours\[1\] has shape \[2, 16, 4\], expected \[B, 16, 16\]"):
        enc(x._replace(neighbours=(x.neighbours[0], x.neighbours[1][..., :4])))
    with pytest.raises(PluginError, match="centres is torch.float32, expected integer indices"):
        enc(x._replace(centres=x.centres.float()))


def test_identity_changed_and_the_previous_one_is_legacy() -> None:
    enc = build_encoder(**DEMO)
    ident = enc.identity()
    assert "grouping" in ident["preprocessing"]  # the feature cache keys on it: a new namespace
    previous = {**ident, "preprocessing": {k: v for k, v in ident["preprocessing"].items() if k != "grouping"}}
    assert previous in enc.legacy_identities()
    other = build_encoder(**{**DEMO, "num_points": 128})
    assert previous not in other.legacy_identities()
    assert all(i["config"] == other.identity()["config"] for i in other.legacy_identities()[:1])


def test_numpy_float32_fps_picks_what_torch_picks() -> None:
    """Loader workers run FPS in numpy (float32, the same operations in the same order): the picks
    must equal the batched torch FPS the encoder ran, ties and duplicates included."""
    from mmkit_plugin_pointcloud.sampling import farthest_point_sample_single

    enc = build_encoder(**TINY)
    clouds = [enc.prepare_points(c)[:, :3] for c in _clouds(colour=False)]
    clouds.append(torch.randn(256, 3, generator=torch.Generator().manual_seed(1)) * 1e-3 + 5.0)  # near-ties
    for cloud in clouds:
        want = farthest_point_sample(cloud[None], 64)[0].numpy()
        assert np.array_equal(farthest_point_sample_single(cloud.numpy(), 64, dtype=np.float32), want)

"""Sampling and grouping moved from forward into preprocess: the features are bitwise those of the
encoder that grouped in every forward, the grouping survives the mixed-precision cast, and runs
recorded before the move still load (their identity is a legacy identity of the same encoder)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from mmkit_plugin_pointcloud.config import DEMO, TINY
from mmkit_plugin_pointcloud.encoder import PointNet2Encoder, build_encoder
from mmkit_plugin_pointcloud.layout import group
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
    x = torch.stack([enc.preprocess(c) for c in clouds])
    assert x.shape == (len(clouds), *enc.input_shape)
    with torch.no_grad():
        before = grouped_every_step(enc, points)
        assert torch.equal(enc(x), before)  # grouping precomputed per cloud, in the loader
        assert torch.equal(enc(points), before)  # bare points: grouped in forward, as a stock PointNet++
        assert torch.equal(enc.stock_input(x), points)
        assert torch.equal(enc(x[2:3]), before[2:3])
        # the blank pass (zeros) and the ablation encode as the old blank cloud did
        assert torch.equal(enc(enc.blank_input(2)), grouped_every_step(enc, torch.zeros_like(points[:2])))


def test_grouping_survives_the_cast_to_the_layers_dtype() -> None:
    # 300 points need two base-256 digits per index; bf16 holds integers exactly only up to 256
    enc = build_encoder(**{**TINY, "num_points": 300}).eval()
    assert enc.layout.digits == 2
    x = torch.stack([enc.preprocess(c) for c in _clouds(colour=True)])
    exact = enc.layout.unpack(x)[1]
    assert int(exact.neighbours[0].max()) > 256  # the test would not notice a lossy cast otherwise
    expected = group(enc.stock_input(x)[..., :3], enc.cfg)
    for dtype in (torch.bfloat16, torch.float16):
        grouping = enc.layout.unpack(x.to(dtype))[1]
        assert torch.equal(grouping.order, expected.order)
        for got, want in zip(grouping.neighbours, expected.neighbours, strict=True):
            assert torch.equal(got, want)
    with torch.no_grad():
        half = enc.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and half.isfinite().all()


def test_a_random_tensor_of_the_input_shape_encodes() -> None:
    """Throughput benchmarks feed random tensors of ``input_shape``: indices are clamped into range."""
    enc = build_encoder(**TINY).eval()
    with torch.no_grad():
        out = enc(100 * torch.randn(3, *enc.input_shape, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (3, enc.num_tokens, enc.output_dim) and out.isfinite().all()


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

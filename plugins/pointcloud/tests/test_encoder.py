"""The PointNet++ encoder: preprocessing, configuration, determinism, identity and persistence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmkit.errors import CheckpointMismatchError, ConfigError, PluginError
from mmkit.modeling.features import move
from mmkit_plugin_pointcloud.config import DEMO, REAL, TINY, PointNet2Config
from mmkit_plugin_pointcloud.encoder import PointNet2Encoder, build_encoder
from mmkit_plugin_pointcloud.shapes import sample_shape


def _clouds(count: int = 3, n: int = 300, colour: bool = False) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for i, name in zip(range(count), ["sphere", "cube", "torus", "cone", "cylinder"] * 2):
        pts = sample_shape(name, rng, n + 37 * i)
        if colour:
            pts = np.concatenate([pts, rng.random((len(pts), 3))], axis=1)
        out.append(pts.astype(np.float32))
    return out


def test_preprocess_normalises_and_resamples() -> None:
    enc = build_encoder(**TINY)  # 6 channels by default
    for raw in (_clouds(1, 1000)[0], _clouds(1, 40)[0]):
        x = enc.prepare_points(raw)
        assert x.shape == (256, 6) and x.dtype == torch.float32
        assert torch.equal(enc.preprocess(raw).points, x)  # the points of the preprocessed item
        assert x[:, :3].norm(dim=1).max() <= 1 + 1e-6
        assert torch.equal(x[:, 3:], torch.zeros(256, 3))  # no colour in the file: zeros
    raw = _clouds(1, 500)[0]
    shifted = raw * 7.5 + np.array([100.0, -3.0, 40.0], dtype=np.float32)
    assert torch.allclose(enc.prepare_points(raw), enc.prepare_points(shifted), atol=1e-5)
    a, b = enc.preprocess(raw), enc.preprocess(torch.from_numpy(raw))
    assert all(torch.equal(p, q) for p, q in zip([a.points, a.centres, *a.neighbours], [b.points, b.centres, *b.neighbours],
                                                   strict=True))


def test_colour_channels_kept_or_dropped() -> None:
    coloured = _clouds(1, 100, colour=True)[0]
    six = build_encoder(**TINY).prepare_points(coloured)
    assert torch.allclose(six[:, 3:], torch.from_numpy(coloured[np.arange(256) % 100, 3:]))
    three = build_encoder(**{**TINY, "in_channels": 3}).prepare_points(coloured)
    assert three.shape == (256, 3)
    with pytest.raises(ValueError):
        build_encoder(**TINY).preprocess(np.zeros((10, 4)))


@pytest.mark.parametrize("options", [TINY, {**TINY, **DEMO}, {**TINY, "transformer_layers": 2, "num_heads": 4},
                                     {**TINY, "invariant_features": False, "centres": [16], "neighbours": [8],
                                      "widths": [16]}])
def test_forward_shape_and_batch_invariance(options: dict) -> None:
    enc = build_encoder(**options).eval()
    items = [enc.preprocess(c) for c in _clouds(4, colour=True)]
    batch = enc.collate(items)
    with torch.no_grad():
        out = enc(batch)
        alone = torch.cat([enc(enc.collate([item])) for item in items])
    assert out.shape == (4, enc.num_tokens, enc.output_dim) == (4, options["centres"][-1], options["output_dim"])
    assert torch.allclose(out, alone, atol=1e-5)
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(PluginError, match=r"encode raised ValueError: expected a collated GroupedCloud batch or "
                                          r"points \[B, 256, \d\], got a tensor of shape \[4, 100, \d\]"):
        enc(batch.points[:, :100])  # named by mmkit, with the plugin's own reason


def test_blank_input_encodes() -> None:
    enc = build_encoder(**TINY).eval()
    with torch.no_grad():
        assert enc(enc.blank_input(2)).isfinite().all()


def test_half_precision_layers() -> None:
    enc = build_encoder(**TINY).eval()
    x = enc.collate([enc.preprocess(c) for c in _clouds(2)])
    with torch.no_grad():
        full = enc(x)
        half = enc.to(torch.bfloat16)(move(x, "cpu", torch.bfloat16))
    assert half.dtype == torch.bfloat16 and half.isfinite().all()
    assert (half.float() - full).abs().mean() < 0.1


def test_random_init_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = build_encoder(**TINY), build_encoder(**TINY)
    assert torch.equal(torch.rand(1), before)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    c = build_encoder(**TINY, seed=1)
    assert not torch.equal(a.feature_proj.weight, c.feature_proj.weight)


def test_identity_tracks_everything_that_changes_outputs() -> None:
    base = build_encoder(**TINY).identity()
    json.dumps(base)
    assert base["config"]["centres"] == [64, 16] and base["pretrained"] is None
    for change in ({"seed": 1}, {"num_points": 128}, {"in_channels": 3}, {"invariant_features": False}):
        assert build_encoder(**{**TINY, **change}).identity() != base, change


@pytest.mark.parametrize("options,reason", [
    ({"centres": [300, 16]}, "centres"),
    ({"neighbours": [16]}, "one entry per level"),
    ({"in_channels": 4}, "in_channels"),
    ({"transformer_layers": 1, "num_heads": 5}, "divisible"),
    ({"colour": True}, "unknown option"),
])
def test_bad_options_are_config_errors(options: dict, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        build_encoder(**{**TINY, **options})


def test_real_config_is_valid() -> None:
    config = PointNet2Config.from_dict(REAL)
    assert config.num_tokens == 256 and config.num_points == 8192


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    enc = build_encoder(**{**TINY, "seed": 7}).eval()
    enc.save_pretrained(tmp_path / "enc")
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == ["config.json", "model.safetensors"]
    loaded = build_encoder(pretrained=str(tmp_path / "enc")).eval()
    batch = enc.collate([enc.preprocess(c) for c in _clouds(2)])
    with torch.no_grad():
        assert torch.equal(enc(batch), loaded(batch))
    ident = loaded.identity()
    assert ident["pretrained"] == str(tmp_path / "enc") and len(ident["weights_sha256"]) == 16
    assert ident["config"] == enc.identity()["config"]
    # Options that keep weight shapes may be overridden; the identity records them.
    more = build_encoder(pretrained=str(tmp_path / "enc"), num_points=512)
    assert more.cfg.num_points == 512 and more.identity()["config"]["num_points"] == 512


def test_load_through_the_mmkit_factory(tmp_path: Path) -> None:
    from mmkit.modeling.components import build_encoder as factory_build
    from mmkit.plugins import PluginHost

    host = PluginHost()
    build_encoder(**TINY).save_pretrained(tmp_path)
    enc = factory_build(host, host.modality("pointcloud"), pretrained=str(tmp_path))
    assert enc.num_tokens == 16 and enc.identity()["pretrained"] == str(tmp_path)


def test_mismatched_weights_are_clear_errors(tmp_path: Path) -> None:
    build_encoder(**TINY).save_pretrained(tmp_path / "a")
    config_file = tmp_path / "a" / "config.json"
    meta = json.loads(config_file.read_text())
    meta["widths"] = [16, 64]
    config_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch.*levels\.0"):
        build_encoder(pretrained=str(tmp_path / "a"))
    with pytest.raises(CheckpointMismatchError, match="missing .*transformer"):
        build_encoder(pretrained=str(tmp_path / "a"), widths=[32, 64], transformer_layers=1)
    with pytest.raises(CheckpointMismatchError, match="unexpected"):
        build_encoder(pretrained=str(tmp_path / "a"), widths=[32, 64], invariant_features=False)

    (tmp_path / "a" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointMismatchError, match="model.safetensors"):
        build_encoder(pretrained=str(tmp_path / "a"), widths=[32, 64])
    (tmp_path / "a" / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="lacks model.safetensors"):
        build_encoder(pretrained=str(tmp_path / "a"))
    config_file.write_text(json.dumps({"something": "else"}))
    (tmp_path / "a" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="unknown option.*something"):
        build_encoder(pretrained=str(tmp_path / "a"))


def test_unreachable_pretrained_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="not a saved PointNet2Encoder directory"):
        build_encoder(pretrained=str(tmp_path / "missing" / "dir"))

    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ConfigError, match="someone/pointnet2.*Hugging Face Hub.*unreachable"):
        build_encoder(pretrained="someone/pointnet2")

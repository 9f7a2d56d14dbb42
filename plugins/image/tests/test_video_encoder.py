"""The ``clip_video`` encoder: frames sampled per clip, token counts announced before encoding,
separator rows, spatial and temporal pooling, batch invariance, blank batches and identity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmkit.errors import ConfigError, InputError
from mmkit.modeling.features import RaggedFeatures, move
from mmkit_plugin_image.video_encoder import VideoBatch, build_video_encoder
from mmkit_plugin_image.video_io import load_video

#: 16 px frames, 4 px patches: 16 tokens of width 32 per frame.
TINY = {"image_size": 16, "patch_size": 4, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "feature_layer": -1}


def build(**options):
    torch.manual_seed(0)
    return build_video_encoder(**{**TINY, **options}).eval()


@pytest.fixture(scope="module")
def encoder():
    return build(max_frames=4)


def clip(count: int, seed: int = 0, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), np.uint8)


def test_preprocess_samples_at_most_max_frames(encoder, tmp_path: Path) -> None:
    frames = clip(10)
    path = tmp_path / "c.gif"
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], disposal=1)
    from_file = encoder.preprocess(load_video(path))
    assert from_file.shape == (4, 3, 16, 16) and from_file.dtype == torch.float32
    # The frames sampled from 10 (1, 3, 6, 8) preprocessed one by one, as the image encoder does.
    expected = torch.stack([encoder.frame_encoder.preprocess(images[i].convert("RGB")) for i in (1, 3, 6, 8)])
    assert torch.equal(from_file, expected)
    # Frames from memory (an array, a tensor, a list of images) give the same input.
    assert torch.equal(encoder.preprocess(frames), expected)
    assert torch.equal(encoder.preprocess(torch.from_numpy(frames)), expected)
    assert torch.equal(encoder.preprocess(images), expected)
    assert encoder.preprocess(frames[:3]).shape == (3, 3, 16, 16)


def test_preprocess_refuses_what_is_not_a_clip(encoder) -> None:
    for bad in ([], "clip.gif", np.zeros((4, 16, 16, 3), np.float32), [np.zeros((2, 2, 2, 2), np.uint8)]):
        with pytest.raises(InputError):
            encoder.preprocess(bad)


def test_token_counts_follow_the_frame_count(encoder) -> None:
    items = [encoder.preprocess(clip(n, seed=n)) for n in (1, 2, 4, 9)]
    assert [len(i) for i in items] == [1, 2, 4, 4]
    # 16 tokens a frame and a separator between frames.
    assert [encoder.num_tokens_for(i) for i in items] == [16, 33, 67, 67]
    assert encoder.num_tokens is None and encoder.input_shape is None and encoder.uses_separators


def test_features_layout_and_separators(encoder) -> None:
    items = [encoder.preprocess(clip(n, seed=n)) for n in (3, 1, 4)]
    batch = encoder.collate(items)
    assert isinstance(batch, VideoBatch) and batch.frames.shape == (8, 3, 16, 16)
    assert batch.frame_counts.tolist() == [3, 1, 4]
    with torch.no_grad():
        out = encoder(batch)
        frame_features = encoder.frame_encoder(batch.frames)
    assert isinstance(out, RaggedFeatures) and out.dim == 32
    assert list(out.counts) == [encoder.num_tokens_for(i) for i in items] == [50, 16, 67]
    first, _, _ = out.split()
    marks = out.split_separators()[0]
    # Frame 0's tokens, a separator, frame 1's tokens, a separator, frame 2's tokens.
    assert marks.tolist() == [False] * 16 + [True] + [False] * 16 + [True] + [False] * 16
    assert torch.equal(first[marks], torch.zeros(2, 32))
    assert torch.allclose(first[~marks], frame_features[:3].reshape(48, 32))
    assert int(out.separators.sum()) == 2 + 0 + 3


def test_batch_encodes_as_items_one_by_one(encoder) -> None:
    items = [encoder.preprocess(clip(n, seed=10 + n)) for n in (4, 2, 1, 3)]
    with torch.no_grad():
        together = encoder(encoder.collate(items)).split()
        alone = [encoder(encoder.collate([item])).values for item in items]
    for a, b in zip(together, alone):
        assert torch.allclose(a, b, atol=1e-5)


def test_temporal_pooling_averages_groups_of_frames() -> None:
    pooled = build(max_frames=8, temporal_pool=3)
    plain = build(max_frames=8)
    item = pooled.preprocess(clip(7))
    assert item.shape[0] == 7 and pooled.num_tokens_for(item) == 3 * 16 + 2  # groups of 3, 3, 1
    with torch.no_grad():
        out = pooled(pooled.collate([item]))
        frames = plain.frame_encoder(item)
    rows = out.values[~out.separators]
    expected = torch.cat([frames[0:3].mean(0), frames[3:6].mean(0), frames[6:7].mean(0)])
    assert torch.allclose(rows, expected, atol=1e-6)


def test_spatial_pooling_and_no_separators() -> None:
    encoder = build(max_frames=4, spatial_pool=2, separators=False)
    assert encoder.tokens_per_frame == 4 and not encoder.uses_separators
    item = encoder.preprocess(clip(3))
    assert encoder.num_tokens_for(item) == 12
    with torch.no_grad():
        out = encoder(encoder.collate([item]))
        frames = encoder.frame_encoder(item)  # [3, 16, 32] on a 4 x 4 grid
    assert out.separators is None and out.counts == (12,)
    grid = frames.reshape(3, 4, 4, 32)
    top_left = grid[:, :2, :2].mean(dim=(1, 2))
    assert torch.allclose(out.values.reshape(3, 4, 32)[:, 0], top_left, atol=1e-6)


def test_blank_and_moves_like_any_batch(encoder) -> None:
    blank = encoder.blank(3)
    assert blank.frames.shape == (3, 3, 16, 16) and blank.frame_counts.tolist() == [1, 1, 1]
    moved = move(blank, "cpu", torch.bfloat16)
    assert isinstance(moved, VideoBatch)
    assert moved.frames.dtype == torch.bfloat16 and moved.frame_counts.dtype == torch.long
    with torch.no_grad():
        out = encoder(blank)
    assert out.counts == (16, 16, 16) and torch.isfinite(out.values).all()


def test_the_blank_item_joins_real_items(encoder) -> None:
    """The evaluation ablation's input: a clip of one zero frame, counted and collated with real clips."""
    item = encoder.preprocess(clip(3))
    blank = encoder.blank_item()
    assert torch.equal(blank, torch.zeros(1, 3, 16, 16)) and encoder.num_tokens_for(blank) == 16
    batch = encoder.collate([item, blank, item])
    assert batch.frame_counts.tolist() == [3, 1, 3]
    with torch.no_grad():
        out = encoder(batch)
    assert out.counts == (50, 16, 50)
    with pytest.raises(TypeError, match="one clip"):
        encoder.num_tokens_for(encoder.blank(2))


def test_collate_refuses_items_of_another_shape(encoder) -> None:
    with pytest.raises(TypeError, match="item 1"):
        encoder.collate([torch.zeros(2, 3, 16, 16), torch.zeros(3, 16, 16)])
    with pytest.raises(TypeError, match="item 0"):
        encoder.collate([torch.zeros(0, 3, 16, 16)])


def test_identity_covers_every_option(encoder) -> None:
    base = encoder.identity()
    json.dumps(base)
    assert base == build(max_frames=4).identity()
    others = [build(max_frames=5), build(max_frames=4, temporal_pool=2), build(max_frames=4, spatial_pool=2),
              build(max_frames=4, separators=False), build(max_frames=4, seed=1),
              build(max_frames=4, feature_layer=-2)]
    identities = [json.dumps(o.identity(), sort_keys=True) for o in others]
    assert json.dumps(base, sort_keys=True) not in identities and len(set(identities)) == len(identities)


@pytest.mark.parametrize("options, words", [
    ({"max_frames": 0}, "max_frames"), ({"temporal_pool": 1.5}, "temporal_pool"),
    ({"spatial_pool": 3}, "spatial_pool"), ({"spatial_pool": 2, "drop_cls": False}, "drop_cls"),
    ({"separators": "yes"}, "separators"), ({"anyres": True}, "anyres"),
])
def test_bad_options(options, words) -> None:
    with pytest.raises(ConfigError, match=words):
        build(**options)


def test_mixed_precision_forward() -> None:
    """Parameters in bf16 and buffers in fp32, as DeepSpeed leaves them."""
    encoder = build(max_frames=4)
    item = encoder.preprocess(clip(3))
    with torch.no_grad():
        reference = encoder(encoder.collate([item])).values
    for param in encoder.parameters():
        param.data = param.data.to(torch.bfloat16)
    with torch.no_grad():
        out = encoder(move(encoder.collate([item]), "cpu", torch.bfloat16))
    assert out.values.dtype == torch.bfloat16 and out.counts == (50,)
    assert torch.allclose(out.values.float(), reference, atol=0.1 * reference.abs().max().item())

"""Any-resolution images (``anyres: true``): grids and token counts by aspect ratio, checked against
transformers' own LLaVA-NeXT (image processor, token count, ``pack_image_features``); mixed batches,
batch invariance, blank, pooling; and the fixed 1.0 path left exactly as it was."""

from __future__ import annotations

import functools
import pickle
import types

import numpy as np
import pytest
import torch
from PIL import Image

from mmkit.errors import ConfigError
from mmkit.modeling.encoder import encode_items
from mmkit.modeling.features import RaggedFeatures, move
from mmkit_plugin_image.anyres import AnyresBatch, AnyresImage, AnyresLayout, default_pinpoints, grid_shape
from mmkit_plugin_image.encoder import build_encoder
from mmkit_plugin_image.plugin import TINY_CLIP

S, SIDE, DIM = TINY_CLIP["image_size"], TINY_CLIP["image_size"] // TINY_CLIP["patch_size"], TINY_CLIP["hidden_size"]
#: (height, width) -> expected (rows, cols) of 16 px crops and tokens (base 16 + map rows x (cols + newline)).
THREE_RATIOS = {
    "square 1:1": ((32, 32), (2, 2), 16 + 8 * (8 + 1)),
    "wide 2:1": ((32, 64), (1, 2), 16 + 4 * (8 + 1)),
    "tall 1:3": ((48, 16), (3, 1), 16 + 12 * (4 + 1)),
}
#: Shapes whose best canvas does not match their aspect ratio, so unpadding drops rows or columns.
ODD_SHAPES = [(32, 48), (17, 50), (100, 7), (20, 21), (1, 300), (300, 1)]


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + 1000 * height + width)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def anyres():
    return build_encoder(**TINY_CLIP, anyres=True).eval()


def _encode(encoder, images: list[Image.Image]) -> RaggedFeatures:
    with torch.no_grad():
        return encoder(encoder.collate([encoder.preprocess(img) for img in images]))


@pytest.mark.parametrize("name", list(THREE_RATIOS))
def test_three_aspect_ratios_get_their_grid_and_token_count(anyres, name: str) -> None:
    size, grid, tokens = THREE_RATIOS[name]
    item = anyres.preprocess(_image(*size))
    assert isinstance(item, AnyresImage) and item.grid == grid and item.original == size
    assert tuple(item.pixels.shape) == (1 + grid[0] * grid[1], 3, S, S)
    assert anyres.num_tokens_for(item) == tokens
    out = _encode(anyres, [_image(*size)])
    assert out.counts == (tokens,) and out.dim == DIM
    # One newline per feature-map row, at the end of the row.
    map_rows = grid[0] * SIDE
    assert int(out.separators.sum()) == map_rows
    assert not out.separators[: SIDE * SIDE].any() and bool(out.separators[-1])


def test_declares_a_variable_encoder(anyres) -> None:
    assert anyres.num_tokens is None and anyres.input_shape is None and anyres.uses_separators is True
    plain = build_encoder(**TINY_CLIP)
    assert plain.num_tokens == SIDE * SIDE and plain.input_shape == (3, S, S) and plain.uses_separators is False


def _hf_token_count(height: int, width: int, pinpoints: list[list[int]], size: int, patch: int) -> int:
    """transformers' own count (LlavaNextProcessor._get_number_of_features), without a tokenizer."""
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    proc = types.SimpleNamespace(image_processor=types.SimpleNamespace(image_grid_pinpoints=pinpoints),
                                 patch_size=patch, num_additional_image_tokens=0)
    proc._get_unpadded_features = functools.partial(LlavaNextProcessor._get_unpadded_features, proc)
    return LlavaNextProcessor._get_number_of_features(proc, height, width, size, size)


@pytest.mark.parametrize("size", [v[0] for v in THREE_RATIOS.values()] + ODD_SHAPES, ids=str)
def test_matches_transformers_llava_next(anyres, size: tuple[int, int]) -> None:
    """Pixels as LlavaNextImageProcessor makes them, the count LlavaNextProcessor reserves, and the rows
    pack_image_features lays out (its image_newline where our separators are)."""
    from transformers import LlavaNextImageProcessorPil
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    pinpoints = [list(p) for p in anyres.grid_pinpoints]
    image = _image(*size)
    hf = LlavaNextImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                    image_grid_pinpoints=pinpoints, do_pad=False, resample=3)
    reference = hf(images=image, return_tensors="pt")
    item = anyres.preprocess(image)
    assert torch.equal(item.pixels, reference["pixel_values"][0])
    assert reference["image_sizes"][0].tolist() == list(item.original)
    assert anyres.num_tokens_for(item) == _hf_token_count(*size, pinpoints, S, TINY_CLIP["patch_size"])

    with torch.no_grad():
        ours = anyres(anyres.collate([item]))
        crops = anyres.model(pixel_values=item.pixels).last_hidden_state[:, 1:]
    config = types.SimpleNamespace(vision_config=types.SimpleNamespace(image_size=S, patch_size=TINY_CLIP["patch_size"]),
                                   image_grid_pinpoints=pinpoints)
    newline = torch.full((DIM,), 1234.5)
    (packed,), lengths = LlavaNextModel.pack_image_features(types.SimpleNamespace(config=config), [crops],
                                                            torch.tensor([list(size)]), "default", newline)
    assert lengths.tolist() == list(ours.counts)
    seps = ours.separators
    assert torch.equal(packed[seps], newline.expand(int(seps.sum()), DIM))
    assert torch.allclose(packed[~seps], ours.values[~seps], atol=1e-6)
    assert (ours.values[seps] == 0).all()  # the projector's learned separator goes there


def test_mixed_batch_counts_and_batch_invariance(anyres) -> None:
    images = [_image(*size) for size in [(32, 64), (48, 16), (32, 48), (32, 32)]]
    items = [anyres.preprocess(img) for img in images]
    batch = anyres.collate(items)
    assert isinstance(batch, AnyresBatch) and len(batch) == 4 and batch.crops == [3, 4, 5, 5]
    with torch.no_grad():
        together = encode_items(anyres, items)  # checks each count against num_tokens_for
        alone = [anyres(anyres.collate([item])) for item in items]
    assert together.counts == tuple(anyres.num_tokens_for(item) for item in items)
    assert torch.equal(anyres(batch).values, together.values)
    assert len(set(together.counts)) == 4  # the shapes differ, so do their token counts
    for i, (rows, seps) in enumerate(zip(together.split(), together.split_separators(), strict=True)):
        assert alone[i].counts == (len(rows),)
        assert torch.allclose(rows, alone[i].values, atol=1e-5), f"item {i}"
        assert torch.equal(seps, alone[i].separators)


def test_blank_is_a_one_by_one_grid(anyres) -> None:
    blank = anyres.blank(3)
    assert isinstance(blank, AnyresBatch) and len(blank) == 3 and blank.grids == ((1, 1),) * 3
    with torch.no_grad():
        out = anyres(blank)
    assert out.counts == (SIDE * SIDE + SIDE * (SIDE + 1),) * 3
    assert torch.isfinite(out.values).all()


def test_anyres_off_is_the_fixed_encoder() -> None:
    """The 1.0 path: tensors in, [B, 16, 32] out, equal to the CLIP tower's own penultimate-layer patch
    tokens on the CLIP processor's pixels; no anyres key in the identity; the explicit default matches."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mmkit.modeling import seeded
    from mmkit_plugin_image.encoder import _processor_class

    default, explicit = build_encoder(**TINY_CLIP), build_encoder(**TINY_CLIP, anyres=False)
    assert default.identity() == explicit.identity() and "anyres" not in default.identity()
    images = [_image(24, 32), _image(50, 20)]
    x = default.collate([default.preprocess(img) for img in images])
    processor = _processor_class()(size={"shortest_edge": S}, crop_size={"height": S, "width": S}, resample=3)
    assert torch.equal(x, processor(images=images, return_tensors="pt")["pixel_values"])
    with seeded(0):
        tower = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).eval()
    with torch.no_grad():
        out = default(x)
        reference = tower(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert torch.equal(out, reference)
    assert torch.equal(default.blank(2), torch.zeros(2, 3, S, S)) and default.num_tokens_for(x[0]) == 16


@pytest.mark.parametrize(("pool", "side"), [(2, 2), (3, 2)])
def test_pooling_averages_each_crop_grid(pool: int, side: int) -> None:
    encoder = build_encoder(**TINY_CLIP, anyres=True, anyres_pool=pool, anyres_unpad=False).eval()
    full = build_encoder(**TINY_CLIP, anyres=True, anyres_unpad=False).eval()
    images = [_image(*v[0]) for v in THREE_RATIOS.values()]
    pooled, unpooled = _encode(encoder, images), _encode(full, images)
    grids = [v[1] for v in THREE_RATIOS.values()]
    expected = tuple(side * side + rows * side * (cols * side + 1) for rows, cols in grids)
    assert pooled.counts == expected == tuple(encoder.num_tokens_for(encoder.preprocess(img)) for img in images)
    assert all(p < u for p, u in zip(pooled.counts, unpooled.counts, strict=True))
    # The base view's first pooled feature averages the top-left pool x pool patches (fewer at an edge).
    base = unpooled.split()[0][: SIDE * SIDE].view(SIDE, SIDE, DIM)
    assert torch.allclose(pooled.split()[0][0], base[:pool, :pool].mean(dim=(0, 1)), atol=1e-5)
    assert torch.allclose(pooled.split()[0][side * side - 1], base[(side - 1) * pool:, (side - 1) * pool:].mean(dim=(0, 1)),
                          atol=1e-5)


def test_pooled_counts_with_unpad() -> None:
    encoder = build_encoder(**TINY_CLIP, anyres=True, anyres_pool=2)
    counts = {name: encoder.num_tokens_for(encoder.preprocess(_image(*v[0]))) for name, v in THREE_RATIOS.items()}
    assert counts == {"square 1:1": 4 + 4 * 5, "wide 2:1": 4 + 2 * 5, "tall 1:3": 4 + 6 * 3}


def test_vit_l14_336_token_counts() -> None:
    """The counts for LLaVA-NeXT's own setting (CLIP ViT-L/14 at 336 px, 24x24 patches), computed by
    the layout alone and checked against transformers' count; the same with 2x2 pooling."""
    pinpoints = default_pinpoints(336)
    assert [list(p) for p in pinpoints] == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    layout, pooled = AnyresLayout(side=24), AnyresLayout(side=12)
    sizes = {"square 1:1": (672, 672), "wide 2:1": (640, 1280), "tall 1:3": (900, 300), "photo 4:3": (480, 640)}
    counts = {name: layout.num_tokens(grid_shape(hw, pinpoints, 336), hw) for name, hw in sizes.items()}
    assert counts == {"square 1:1": 576 + 48 * 49, "wide 2:1": 576 + 24 * 49, "tall 1:3": 576 + 72 * 25,
                      "photo 4:3": 576 + 36 * 49}
    for name, hw in sizes.items():
        assert counts[name] == _hf_token_count(*hw, [list(p) for p in pinpoints], 336, 14), name
    assert {name: pooled.num_tokens(grid_shape(hw, pinpoints, 336), hw) for name, hw in sizes.items()} == {
        "square 1:1": 144 + 24 * 25, "wide 2:1": 144 + 12 * 25, "tall 1:3": 144 + 36 * 13, "photo 4:3": 144 + 18 * 25}


def test_identity_keys_on_the_anyres_options(anyres) -> None:
    ident = anyres.identity()
    assert ident["num_tokens"] is None and ident["anyres"]["grid_pinpoints"][2] == [32, 32]
    others = [build_encoder(**TINY_CLIP).identity(), build_encoder(**TINY_CLIP, anyres=True, anyres_pool=2).identity(),
              build_encoder(**TINY_CLIP, anyres=True, anyres_unpad=False).identity(),
              build_encoder(**TINY_CLIP, anyres=True, grid_pinpoints=[[16, 32], [32, 16]]).identity()]
    assert all(other != ident for other in others)
    assert build_encoder(**TINY_CLIP, anyres=True).identity() == ident


def test_items_pickle_and_move(anyres) -> None:
    item = anyres.preprocess(_image(32, 64))
    back = pickle.loads(pickle.dumps(item))  # data-loader workers send items through pickle
    assert torch.equal(back.pixels, item.pixels) and back.grid == item.grid and back.original == item.original
    moved = move(anyres.collate([item, back]), "cpu", torch.bfloat16)
    assert isinstance(moved, AnyresBatch) and moved.pixels.dtype == torch.bfloat16 and moved.grids == ((1, 2),) * 2


def test_custom_pinpoints_choose_the_grid() -> None:
    encoder = build_encoder(**TINY_CLIP, anyres=True, grid_pinpoints=[[16, 64], [64, 16]])
    assert encoder.preprocess(_image(10, 50)).grid == (1, 4)
    assert encoder.preprocess(_image(50, 10)).grid == (4, 1)


@pytest.mark.parametrize(("options", "match"), [
    ({"grid_pinpoints": [[16, 32]]}, "only apply with anyres: true"),
    ({"anyres_pool": 2}, "only apply with anyres: true"),
    ({"anyres": "yes"}, "anyres='yes'"),
    ({"anyres": True, "grid_pinpoints": [[16, 20]]}, r"\[16, 20\] is not a \[height, width\] pair"),
    ({"anyres": True, "grid_pinpoints": []}, "non-empty list"),
    ({"anyres": True, "anyres_pool": 0}, "anyres_pool=0"),
    ({"anyres": True, "anyres_unpad": "no"}, "anyres_unpad='no'"),
    ({"anyres": True, "drop_cls": False}, "drop_cls: true"),
])
def test_bad_options_are_config_errors(options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_encoder(**TINY_CLIP, **options)


def test_collate_refuses_what_preprocess_did_not_make(anyres) -> None:
    with pytest.raises(TypeError, match="expected the AnyresImage"):
        anyres.collate([torch.zeros(3, S, S)])
    bad = AnyresImage(torch.zeros(2, 3, S, S), (2, 2), (32, 32))
    with pytest.raises(ValueError, match="for a 2x2 grid"):
        anyres.collate([bad])


def test_llava_hf_export_refuses_an_anyres_run() -> None:
    from mmkit_plugin_image.export_llava import why_not

    image = {"encoder": "clip", "projector": "mlp", "projector_options": {}, "encoder_options": {"anyres": False}}
    assert why_not({"modalities": {"image": image}}) is None
    reason = why_not({"modalities": {"image": {**image, "encoder_options": {"anyres": True}}}})
    assert reason and "anyres" in reason and "LlavaForConditionalGeneration" in reason


def test_the_blank_item_joins_real_items(anyres) -> None:
    """The evaluation ablation's input: a 1x1 grid of zero crops, counted and collated with real images."""
    item = anyres.preprocess(_image(32, 64))
    blank = anyres.blank_item()
    batch = anyres.collate([item, blank])
    assert batch.grids == ((1, 2), (1, 1)) and batch.crops == [3, 2]
    assert anyres.num_tokens_for(blank) == SIDE * SIDE + SIDE * (SIDE + 1)
    with torch.no_grad():
        out = anyres(batch)
    assert out.counts == (anyres.num_tokens_for(item), anyres.num_tokens_for(blank))
    assert torch.equal(anyres.blank(2).pixels, anyres.collate([blank, blank]).pixels)


def test_anyres_on_a_saved_checkpoint(tmp_path) -> None:
    """A ``from_pretrained`` CLIP and its saved image processor tile the same way (the base view's side
    comes from the processor's ``size``)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mmkit_plugin_image.encoder import _processor_class

    torch.manual_seed(5)
    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).save_pretrained(tmp_path)
    _processor_class()(size={"shortest_edge": S}, crop_size={"height": S, "width": S}).save_pretrained(tmp_path)
    encoder = build_encoder(pretrained=str(tmp_path), anyres=True, anyres_pool=2).eval()
    items = [encoder.preprocess(_image(*v[0])) for v in THREE_RATIOS.values()]
    assert [item.grid for item in items] == [v[1] for v in THREE_RATIOS.values()]
    with torch.no_grad():
        out = encode_items(encoder, items)
    assert out.counts == (4 + 4 * 5, 4 + 2 * 5, 4 + 6 * 3)
    assert encoder.identity()["anyres"]["pool"] == 2 and encoder.identity()["pretrained"] == str(tmp_path)


def test_prompt_reserves_each_image_its_own_count(anyres, tmp_path) -> None:
    """What ``mmkit data inspect`` reports per input: two images of different aspect ratios get
    different slot counts, each what the encoder announces (the core's inspect_record, counting with
    this encoder)."""
    from pathlib import Path

    from mmkit.data.inspect import inspect_record
    from mmkit.data.validate import prompt_builder_for
    from mmkit.plugins import get_host
    from mmkit.records import Sample, Turn
    from mmkit.specs import resolve

    spec = get_host().modality("image")
    load = resolve(spec.load)
    paths = []
    for name, size in (("wide", THREE_RATIOS["wide 2:1"][0]), ("tall", THREE_RATIOS["tall 1:3"][0])):
        _image(*size).save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    prompts = prompt_builder_for("tiny", {"image": spec.markers}, {"image": None})
    sample = Sample(id="two", turns=(Turn("user", "<image> and <image> compare the two"), Turn("assistant", "yes")),
                    inputs={"image": tuple(paths)})

    def counter(s: Sample) -> dict[str, list[int]]:
        return {"image": [anyres.num_tokens_for(anyres.preprocess(load(Path(p)))) for p in s.inputs["image"]]}

    entry = inspect_record(prompts, sample, counter)
    assert "error" not in entry
    assert entry["slots"] == {"image": [THREE_RATIOS["wide 2:1"][2], THREE_RATIOS["tall 1:3"][2]]}

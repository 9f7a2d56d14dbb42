"""The ``clip`` encoder: real ``from_pretrained`` loading, layer and CLS options, identity, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from image_files import gradient
from PIL import Image

from mmkit.errors import ConfigError, PluginError
from mmkit_plugin_image.encoder import _processor_class, build_encoder
from mmkit_plugin_image.plugin import TINY_CLIP

TINY = dict(TINY_CLIP)


def _images() -> torch.Tensor:
    return [Image.fromarray(gradient()), Image.fromarray(gradient(30, 20, flip=True))]


def _batch(encoder) -> torch.Tensor:
    return torch.stack([encoder.preprocess(img) for img in _images()])


def _save_checkpoint(path: Path, *, full_clip: bool, crop: int = 16) -> dict[str, torch.Tensor]:
    """Save a tiny random CLIP (vision-only or text+vision, like the hub's openai/clip-*) and its
    image processor; return the vision weights as saved."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(123)
    vision = CLIPVisionConfig(**TINY)
    if full_clip:
        text = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                "num_attention_heads": 2, "max_position_embeddings": 16}
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=16))
        weights = {k.removeprefix("vision_model."): v.clone() for k, v in model.state_dict().items()
                   if k.startswith("vision_model.")}
    else:
        model = CLIPVisionModel(vision)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(path)
    _processor_class()(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}).save_pretrained(path)
    return weights


@pytest.mark.parametrize("full_clip", [False, True], ids=["vision-checkpoint", "clip-checkpoint"])
def test_from_pretrained_loads_the_saved_weights(tmp_path: Path, full_clip: bool) -> None:
    saved = _save_checkpoint(tmp_path, full_clip=full_clip)
    enc = build_encoder(pretrained=str(tmp_path), feature_layer=-1).eval()
    assert enc.input_shape == (3, 16, 16) and enc.num_tokens == 16 and enc.output_dim == 32
    loaded = enc.model.state_dict()
    assert loaded, "no weights"
    for name, tensor in loaded.items():
        key = next(k for k in saved if k.endswith(name))  # 4.x nests names under vision_model.
        assert torch.equal(tensor, saved[key]), name
    with torch.no_grad():
        out = enc(_batch(enc))
    assert out.shape == (2, 16, 32) and out.dtype == torch.float32
    ident = enc.identity()
    assert ident["pretrained"] == str(tmp_path) and ident["init_seed"] is None
    assert ident["vision_config"]["hidden_size"] == 32 and ident["processor"]["crop_size"]["height"] == 16


def test_pretrained_matches_the_model_it_was_saved_from(tmp_path: Path) -> None:
    _save_checkpoint(tmp_path, full_clip=False)
    loaded = build_encoder(pretrained=str(tmp_path)).eval()
    fresh = build_encoder(**TINY).eval()
    fresh.model.load_state_dict(loaded.model.state_dict())
    x = _batch(loaded)
    with torch.no_grad():
        assert torch.allclose(loaded(x), fresh(x), atol=1e-6)


def test_identity_tracks_the_checkpoint_weights(tmp_path: Path) -> None:
    _save_checkpoint(tmp_path, full_clip=False)
    first = build_encoder(pretrained=str(tmp_path)).identity()
    assert build_encoder(pretrained=str(tmp_path)).identity() == first
    torch.manual_seed(999)  # overwrite the checkpoint in place with other weights: same path, new identity
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(**TINY)).save_pretrained(tmp_path)
    second = build_encoder(pretrained=str(tmp_path)).identity()
    assert second["pretrained"] == first["pretrained"]
    assert second["weights_sha256"] != first["weights_sha256"]


def test_pretrained_rejects_architecture_options_and_mismatched_processor(tmp_path: Path) -> None:
    _save_checkpoint(tmp_path / "ok", full_clip=False)
    with pytest.raises(ConfigError, match="fixes the architecture"):
        build_encoder(pretrained=str(tmp_path / "ok"), hidden_size=64)
    with pytest.raises(ConfigError, match="seed"):
        build_encoder(pretrained=str(tmp_path / "ok"), seed=3)
    _save_checkpoint(tmp_path / "bad", full_clip=False, crop=24)
    with pytest.raises(ConfigError, match="image processor produces"):
        build_encoder(pretrained=str(tmp_path / "bad"))


def test_feature_layer_selects_that_hidden_state() -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = CLIPVisionModel(CLIPVisionConfig(**TINY)).eval()
    probe = build_encoder(**TINY)
    x = _batch(probe)
    with torch.no_grad():
        states = reference(pixel_values=x, output_hidden_states=True).hidden_states
    assert len(states) == TINY["num_hidden_layers"] + 1
    for layer in (-3, -2, -1, 0, 1, 2):
        enc = build_encoder(feature_layer=layer, drop_cls=False, seed=0, **TINY).eval()
        # Layers after the chosen one are dropped.
        assert sum(1 for n, _ in enc.model.named_modules() if n.endswith("self_attn")) == layer % 3
        # The truncated model holds a subset of the reference's weights: copy exactly that subset.
        kept = enc.model.state_dict()
        missing = enc.model.load_state_dict({k: v for k, v in reference.state_dict().items() if k in kept})
        assert not missing.missing_keys and not missing.unexpected_keys
        with torch.no_grad():
            assert torch.allclose(enc(x), states[layer], atol=1e-6), layer


def test_drop_cls_removes_exactly_the_first_token() -> None:
    keep = build_encoder(drop_cls=False, **TINY).eval()
    drop = build_encoder(drop_cls=True, **TINY).eval()
    assert keep.num_tokens == 17 and drop.num_tokens == 16
    x = _batch(keep)
    with torch.no_grad():
        assert torch.equal(keep(x)[:, 1:], drop(x))


def test_options_change_values_and_identity() -> None:
    x = _batch(build_encoder(**TINY))
    variants = {
        "default": {},
        "layer": {"feature_layer": -1},
        "cls": {"drop_cls": False},
        "seed": {"seed": 1},
        "resample": {"resample": "nearest"},
        "width": {"hidden_size": 48, "num_attention_heads": 3},
    }
    encoders = {k: build_encoder(**{**TINY, **v}).eval() for k, v in variants.items()}
    idents = {k: e.identity() for k, e in encoders.items()}
    assert len({str(sorted(i.items())) for i in idents.values()}) == len(variants)
    assert build_encoder(**TINY).identity() == idents["default"]
    with torch.no_grad():
        base = encoders["default"](x)
        assert not torch.allclose(encoders["layer"](x), base)
        assert not torch.allclose(encoders["seed"](x), base)
        assert torch.equal(build_encoder(**TINY).eval()(x), base)  # same options, same weights
    assert not torch.equal(encoders["resample"].preprocess(_images()[0]), encoders["default"].preprocess(_images()[0]))


def test_seeded_init_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_encoder(**TINY)
    assert torch.equal(torch.rand(3), expected)


def test_preprocess_resizes_and_normalises_any_image() -> None:
    enc = build_encoder(**TINY)
    for size in [(5, 7), (300, 20), (16, 16)]:
        x = enc.preprocess(Image.new("L", size, 255))
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    white = enc.preprocess(Image.new("RGB", (16, 16), (255, 255, 255)))
    mean, std = torch.tensor(enc.processor.image_mean), torch.tensor(enc.processor.image_std)
    assert torch.allclose(white[:, 0, 0], (1 - mean) / std, atol=1e-5)
    with pytest.raises(TypeError, match="PIL image"):
        enc.preprocess(torch.zeros(3, 16, 16))


def test_bad_options_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="feature_layer"):
        build_encoder(feature_layer=3, **TINY)
    with pytest.raises(ConfigError, match="drop_cls"):
        build_encoder(drop_cls="no", **TINY)
    with pytest.raises(ConfigError, match="resample"):
        build_encoder(resample="lanczos", **TINY)
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        build_encoder(**{**TINY, "patch_size": 5})
    with pytest.raises(TypeError, match="unknown option"):
        build_encoder(hiden_size=3, **TINY)


def test_core_factory_builds_it_and_reports_bad_options() -> None:
    from mmkit.modeling.components import build_encoder as core_build
    from mmkit.plugins import PluginHost

    host = PluginHost()
    spec = host.modality("image")
    enc = core_build(host, spec)  # tiny config + the demo's options
    assert (enc.num_tokens, enc.output_dim, enc.input_shape) == (16, 128, (3, 16, 16))
    assert enc.identity()["feature_layer"] == -1
    with pytest.raises(PluginError, match="bad options"):
        core_build(host, spec, options={"no_such_option": 1})


def test_blank_input_encodes() -> None:
    enc = build_encoder(**TINY).eval()
    with torch.no_grad():
        out = enc(enc.blank_input(3))
    assert out.shape == (3, 16, 32) and bool(out.isfinite().all())

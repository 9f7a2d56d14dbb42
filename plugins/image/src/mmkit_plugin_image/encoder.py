"""The ``clip`` image encoder: a CLIP vision transformer whose patch tokens become LLM tokens.

LLaVA takes the penultimate layer's patch tokens (``feature_layer=-2``); LAMM takes the last layer
(``feature_layer=-1``); both drop the CLS token. Both choices are options here.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from mmkit.errors import ConfigError
from mmkit.modeling import ModalityEncoder, seeded, weights_sha256

if TYPE_CHECKING:
    from transformers import CLIPVisionModel

#: ``CLIPVisionConfig`` fields accepted as options when building a random-init encoder.
VISION_OPTIONS = frozenset({
    "image_size", "patch_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "hidden_act", "layer_norm_eps", "initializer_range", "initializer_factor",
})
#: Config fields that shape the computation (the weights are covered by their hash). A whitelist keeps
#: the identity stable across transformers versions that add bookkeeping fields to configs.
_IDENTITY_CONFIG_KEYS = VISION_OPTIONS | {"model_type", "num_channels", "attention_dropout"}
_IDENTITY_PROCESSOR_KEYS = frozenset({
    "do_convert_rgb", "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
    "rescale_factor", "do_normalize", "image_mean", "image_std",
})
_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}
#: Bump when ``forward`` changes in a way the configuration does not show (feature caches key on it).
_FEATURE_VERSION = 1


class CLIPImageEncoder(ModalityEncoder):
    """Patch-token features of a CLIP vision tower: ``[B, 3, S, S] -> [B, num_tokens, hidden]``."""

    def __init__(self, model: CLIPVisionModel, processor: Any, *, pretrained: str | None, feature_layer: int,
                 drop_cls: bool, init_seed: int | None):
        super().__init__()
        config = model.config
        depth = int(config.num_hidden_layers)
        # hidden_states has depth + 1 entries: the (pre-layernormed) embeddings, then each layer.
        valid_int = isinstance(feature_layer, int) and not isinstance(feature_layer, bool)
        if not valid_int or not -(depth + 1) <= feature_layer <= depth:
            raise ConfigError(f"image encoder: feature_layer={feature_layer!r} is out of range for a "
                              f"{depth}-layer CLIP (use -{depth + 1}..{depth}; LLaVA -2, LAMM -1)")
        if not isinstance(drop_cls, bool):
            raise ConfigError(f"image encoder: drop_cls={drop_cls!r}; use true or false")
        self.layer_index = feature_layer % (depth + 1)
        # Layers after the chosen one never affect the output: dropping them saves their compute and
        # memory, and keeps LoRA on the encoder from creating parameters that never get a gradient.
        # (transformers 4.x nests the tower under ``vision_model``; 5.x does not.)
        encoder: Any = getattr(model, "vision_model", model).encoder
        encoder.layers = nn.ModuleList(list(encoder.layers)[: self.layer_index])
        self.model = model
        self.processor = processor
        self.pretrained = pretrained
        self.feature_layer = feature_layer
        self.drop_cls = drop_cls
        self.init_seed = init_seed

        size = _square_size(config.image_size)
        patch = _square_size(config.patch_size)
        if size % patch:
            raise ConfigError(f"image encoder: image_size {size} is not a multiple of patch_size {patch}")
        self.input_shape = (3, size, size)
        self.num_tokens = (size // patch) ** 2 + (0 if self.drop_cls else 1)
        self.output_dim = int(config.hidden_size)
        self._check_processor_output()
        self._weights_sha256 = weights_sha256(self.model)

    # -- ModalityEncoder -------------------------------------------------------------------------
    def preprocess(self, raw: Any) -> torch.Tensor:
        """One PIL image (or an ``H x W [x C]`` uint8 array / tensor, as from memory) ->
        ``FloatTensor[3, S, S]``: resize, centre-crop, CLIP normalisation."""
        if isinstance(raw, torch.Tensor):
            raw = raw.detach().cpu().numpy()
        if isinstance(raw, np.ndarray):
            if raw.dtype != np.uint8 or raw.ndim not in (2, 3) or (raw.ndim == 3 and raw.shape[2] not in (1, 3, 4)):
                raise TypeError(f"image encoder: preprocess expects a PIL image or a uint8 H x W [x 1/3/4] "
                                f"array, got {raw.dtype} {raw.shape}")
            raw = Image.fromarray(raw[..., 0] if raw.ndim == 3 and raw.shape[2] == 1 else raw)
        if not isinstance(raw, Image.Image):
            raise TypeError(f"image encoder: preprocess expects a PIL image, got {type(raw).__name__}")
        rgb = raw if raw.mode == "RGB" else raw.convert("RGB")
        pixels = self.processor(images=rgb, return_tensors="pt")["pixel_values"][0]
        return pixels.to(torch.float32)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixel_values.to(dtype))
        # The encoder was cut after the chosen layer, so its last state *is* hidden_states[feature_layer]
        # (with zero layers kept it is the embedding output).
        features = out.last_hidden_state
        return features[:, 1:] if self.drop_cls else features

    def identity(self) -> dict[str, Any]:
        config = {k: v for k, v in self.model.config.to_dict().items() if k in _IDENTITY_CONFIG_KEYS}
        processor = {k: v for k, v in self.processor.to_dict().items() if k in _IDENTITY_PROCESSOR_KEYS}
        ident = {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "feature_version": _FEATURE_VERSION,
            "pretrained": self.pretrained,
            "revision": getattr(self.model.config, "_commit_hash", None),
            "init_seed": self.init_seed,
            # The weights themselves: covers a local checkpoint overwritten in place and random init.
            "weights_sha256": self._weights_sha256,
            "vision_config": config,
            "feature_layer": self.feature_layer,
            "drop_cls": self.drop_cls,
            "processor": {"class": type(self.processor).__name__, **processor},
            "num_tokens": self.num_tokens,
            "output_dim": self.output_dim,
        }
        # Round-trip so enums, tuples and numpy scalars become plain JSON values.
        return json.loads(json.dumps(ident, sort_keys=True, default=_jsonable))

    def legacy_identities(self) -> list[dict[str, Any]]:
        """Releases up to 0.1.0 hashed the weights with their dtype and shape, full length; the rest of
        the identity was the same. Recomputed from these weights, so only the same weights match."""
        return [{**self.identity(), "weights_sha256": _legacy_weights_digest(self.model)}]

    # -- helpers ---------------------------------------------------------------------------------
    def _check_processor_output(self) -> None:
        # A non-square probe image: the processor must still produce exactly the model's input size,
        # since CLIP's position embeddings are fixed to it.
        probe = Image.new("RGB", (self.input_shape[2] * 2 + 3, self.input_shape[1] + 1))
        got = tuple(self.preprocess(probe).shape)
        if got != self.input_shape:
            raise ConfigError(f"image encoder: the image processor produces {got} but the CLIP model "
                              f"expects {self.input_shape}; give it a matching size and crop_size")


def build_encoder(*, pretrained: str | None = None, feature_layer: int = -2, drop_cls: bool = True,
                  seed: int | None = None, resample: str | None = None, **tiny_config: Any) -> CLIPImageEncoder:
    """Build the ``clip`` encoder.

    - ``pretrained``: a Hugging Face hub id or a local directory holding a CLIP (or CLIP vision)
      checkpoint and its ``preprocessor_config.json``; the model and the image processor are loaded
      with ``from_pretrained``. Architecture options are then not allowed (the checkpoint fixes them).
    - ``pretrained=None``: a random-init CLIP vision tower from ``tiny_config`` (``image_size``,
      ``patch_size``, ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
      ``num_attention_heads``, ...), initialised from ``seed`` (default 0) so the weights are
      reproducible, and an image processor for that size (``resample`` = ``bicubic`` (default),
      ``bilinear`` or ``nearest``).
    - ``feature_layer``: which ``hidden_states`` entry to return (LLaVA -2, LAMM -1, 0 = embeddings).
    - ``drop_cls``: drop the CLS token (LLaVA, LAMM) or keep it as the first token.
    """
    unknown = sorted(set(tiny_config) - VISION_OPTIONS)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; known: pretrained, feature_layer, drop_cls, seed, "
                        f"resample, {', '.join(sorted(VISION_OPTIONS))}")
    processor_cls = _processor_class()
    if pretrained is not None:
        fixed = sorted(tiny_config) + [k for k, v in (("seed", seed), ("resample", resample)) if v is not None]
        if fixed:
            raise ConfigError(f"image encoder: {fixed} cannot be combined with pretrained={pretrained!r}; "
                              "the checkpoint fixes the architecture, weights and preprocessing")
        from transformers import CLIPVisionModel

        model = CLIPVisionModel.from_pretrained(pretrained, **_float32_kwargs())
        processor = processor_cls.from_pretrained(pretrained)
        init_seed = None
    else:
        seed = 0 if seed is None else seed
        resample = resample or "bicubic"
        if resample not in _RESAMPLE:
            raise ConfigError(f"image encoder: resample={resample!r}; use one of {sorted(_RESAMPLE)}")
        from transformers import CLIPVisionConfig, CLIPVisionModel

        config = CLIPVisionConfig(**tiny_config)
        with seeded(seed):  # same options -> same weights (mmkit passes the run's seed)
            model = CLIPVisionModel(config)
        size = _square_size(config.image_size)
        processor = processor_cls(
            do_resize=True, size={"shortest_edge": size}, resample=_RESAMPLE[resample],
            do_center_crop=True, crop_size={"height": size, "width": size},
            do_rescale=True, do_normalize=True, do_convert_rgb=True,
        )
        init_seed = seed
    model.eval()
    return CLIPImageEncoder(model, processor, pretrained=pretrained, feature_layer=feature_layer,
                            drop_cls=drop_cls, init_seed=init_seed)


def _processor_class() -> Any:
    """CLIP's image processor. transformers 5 splits it into a torchvision and a Pillow backend; the
    Pillow one needs no torchvision and matches the original CLIP preprocessing, so prefer it."""
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:  # transformers 4.x: CLIPImageProcessor is Pillow/numpy based already
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


def _float32_kwargs() -> dict[str, Any]:
    # Load in float32 whatever the checkpoint stores; the trainer casts the frozen encoder as it needs.
    # transformers renamed ``torch_dtype`` to ``dtype`` in 4.56.
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: torch.float32}


def _square_size(value: Any) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"image encoder: only square sizes are supported, got {value!r}")
        value = value[0]
    return int(value)


def _legacy_weights_digest(model: nn.Module) -> str:
    """The weights hash of releases up to 0.1.0 (kept so their runs still load)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, any dtype (bf16 too)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)

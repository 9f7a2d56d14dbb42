"""The ``clip`` image encoder: a CLIP vision transformer whose patch tokens become LLM tokens.

LLaVA takes the penultimate layer's patch tokens (``feature_layer=-2``); LAMM takes the last layer
(``feature_layer=-1``); both drop the CLS token. Both choices are options here.

With ``anyres: true`` the encoder is variable-size (contract 1.1), as LLaVA-NeXT: a base view plus a
grid of crops chosen by aspect ratio (:mod:`mmkit_plugin_image.anyres`), so the token count follows
the image's shape. Off by default: the fixed ``[B, 3, S, S] -> [B, num_tokens, hidden]`` path is unchanged.
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
from mmkit.modeling.features import RaggedFeatures
from mmkit_plugin_image.anyres import (AnyresBatch, AnyresImage, AnyresLayout, check_pinpoints, default_pinpoints,
                                       grid_shape, pack, tile)

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
    """Patch-token features of a CLIP vision tower: ``[B, 3, S, S] -> [B, num_tokens, hidden]``; with
    ``anyres`` a variable number per image (:class:`AnyresImage` -> :class:`RaggedFeatures`)."""

    def __init__(self, model: CLIPVisionModel, processor: Any, *, pretrained: str | None, feature_layer: int,
                 drop_cls: bool, init_seed: int | None, anyres: bool = False,
                 grid_pinpoints: Any = None, anyres_pool: int | None = None, anyres_unpad: bool | None = None):
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
        self._size, self._side = size, size // patch
        self.anyres = self._init_anyres(anyres, grid_pinpoints, anyres_pool, anyres_unpad)
        self._weights_sha256 = weights_sha256(self.model)

    def _init_anyres(self, anyres: Any, grid_pinpoints: Any, pool: Any, unpad: Any) -> bool:
        if not isinstance(anyres, bool):
            raise ConfigError(f"image encoder: anyres={anyres!r}; use true or false")
        # The projector owns a learned newline (LLaVA-NeXT's image_newline) only for anyres encoders;
        # off, nothing changes from 1.0 (same parameters, same checkpoints).
        self.uses_separators = anyres
        if not anyres:
            given = [k for k, v in (("grid_pinpoints", grid_pinpoints), ("anyres_pool", pool),
                                    ("anyres_unpad", unpad)) if v is not None]
            if given:
                raise ConfigError(f"image encoder: {', '.join(given)} only apply with anyres: true")
            return False
        if not self.drop_cls:
            raise ConfigError("image encoder: anyres lays patch features out on a grid, which has no place for "
                              "the CLS token; use drop_cls: true (as LLaVA-NeXT)")
        pool = 1 if pool is None else pool
        if not isinstance(pool, int) or isinstance(pool, bool) or pool < 1:
            raise ConfigError(f"image encoder: anyres_pool={pool!r}; use 1 (no pooling) or a window side such "
                              "as 2 (2x2 average pooling of each crop's patch grid)")
        unpad = True if unpad is None else unpad
        if not isinstance(unpad, bool):
            raise ConfigError(f"image encoder: anyres_unpad={unpad!r}; use true or false")
        size = self._size
        self.grid_pinpoints = (default_pinpoints(size) if grid_pinpoints is None
                               else check_pinpoints(grid_pinpoints, size))
        self.anyres_pool = pool
        self.layout = AnyresLayout(side=-(-self._side // pool), unpad=unpad)
        # Contract 1.1: the count follows each image (num_tokens_for), any object goes in.
        self.num_tokens = None  # type: ignore[assignment]
        self.input_shape = None  # type: ignore[assignment]
        return True

    # -- ModalityEncoder -------------------------------------------------------------------------
    def preprocess(self, raw: Any) -> torch.Tensor | AnyresImage:
        """One PIL image (or an ``H x W [x C]`` uint8 array / tensor, as from memory) ->
        ``FloatTensor[3, S, S]``: resize, centre-crop, CLIP normalisation. With ``anyres``: an
        :class:`AnyresImage` (base view + crops, each normalised the same way)."""
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
        if not self.anyres:
            return self._square(rgb)
        original = (rgb.height, rgb.width)
        grid = grid_shape(original, self.grid_pinpoints, self._size)
        views = tile(rgb, grid_size=(grid[0] * self._size, grid[1] * self._size), crop=self._size,
                     base=_size_field(self.processor.size), resample=int(getattr(self.processor, "resample", 3)))
        pixels = self.processor(images=views, return_tensors="pt")["pixel_values"]
        return AnyresImage(pixels.to(torch.float32), grid, original)

    def _square(self, rgb: Image.Image) -> torch.Tensor:
        return self.processor(images=rgb, return_tensors="pt")["pixel_values"][0].to(torch.float32)

    def collate(self, items: list[Any]) -> Any:
        if not self.anyres:
            return torch.stack(items)
        for i, item in enumerate(items):
            self._check_item(item, f"item {i}")
        pixels = (torch.cat([item.pixels for item in items]) if items
                  else torch.zeros(0, 3, self._size, self._size))
        return AnyresBatch(pixels, tuple(item.grid for item in items), tuple(item.original for item in items))

    def num_tokens_for(self, item: Any) -> int:
        if not self.anyres:
            return self.num_tokens
        self._check_item(item, "num_tokens_for")
        return self.layout.num_tokens(item.grid, item.original)

    def blank(self, batch_size: int = 1) -> Any:
        """Zeros, as 1.0's ``blank_input``; with ``anyres`` a 1x1 grid of zero crops per input."""
        if not self.anyres:
            return torch.zeros(batch_size, *self.input_shape)
        return self.collate([self.blank_item()] * batch_size)

    def blank_item(self) -> Any:
        """Zeros of ``input_shape``; with ``anyres`` a 1x1 grid of zero crops (base view + one crop)."""
        if not self.anyres:
            return torch.zeros(*self.input_shape)
        return AnyresImage(torch.zeros(2, 3, self._size, self._size), (1, 1), (self._size, self._size))

    def forward(self, pixel_values: torch.Tensor | AnyresBatch) -> torch.Tensor | RaggedFeatures:
        if self.anyres:
            return self._forward_anyres(pixel_values)
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixel_values.to(dtype))
        # The encoder was cut after the chosen layer, so its last state *is* hidden_states[feature_layer]
        # (with zero layers kept it is the embedding output).
        features = out.last_hidden_state
        return features[:, 1:] if self.drop_cls else features

    def _forward_anyres(self, batch: AnyresBatch) -> RaggedFeatures:
        if not isinstance(batch, AnyresBatch):
            raise TypeError(f"image encoder (anyres): forward expects a batch from collate(), got {type(batch).__name__}")
        dtype = next(self.model.parameters()).dtype
        if len(batch) == 0:
            return RaggedFeatures(torch.zeros(0, self.output_dim, dtype=dtype), (), torch.zeros(0, dtype=torch.bool))
        patches = self.model(pixel_values=batch.pixels.to(dtype)).last_hidden_state[:, 1:]  # CLS dropped
        crops, _, dim = patches.shape
        grids = patches.transpose(1, 2).reshape(crops, dim, self._side, self._side)
        if self.anyres_pool > 1:
            # Edge windows of a side that does not divide evenly average what they cover (ceil_mode).
            grids = torch.nn.functional.avg_pool2d(grids, self.anyres_pool, ceil_mode=True)
        rows, separators = [], []
        for features, grid, original in zip(torch.split(grids, batch.crops), batch.grids, batch.originals, strict=True):
            tokens, seps = pack(features, grid, original, self.layout)
            rows.append(tokens)
            separators.append(seps)
        return RaggedFeatures(torch.cat(rows), [len(r) for r in rows], torch.cat(separators))

    def _check_item(self, item: Any, where: str) -> None:
        if not isinstance(item, AnyresImage):
            raise TypeError(f"image encoder (anyres): {where} is a {type(item).__name__}, expected the "
                            "AnyresImage that preprocess returns")
        expected = (1 + item.grid[0] * item.grid[1], 3, self._size, self._size)
        if tuple(item.pixels.shape) != expected:
            raise ValueError(f"image encoder (anyres): {where} has pixels {list(item.pixels.shape)} for a "
                             f"{item.grid[0]}x{item.grid[1]} grid; expected {list(expected)}")

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
        if self.anyres:  # only when on, so 1.0 identities (feature caches, checkpoints) stay as they were
            ident["anyres"] = {"grid_pinpoints": [list(p) for p in self.grid_pinpoints], "pool": self.anyres_pool,
                               "pool_mode": "avg", "unpad": self.layout.unpad, "newline": True,
                               "base": "squash", "pad": "black"}
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
        got = tuple(self._square(probe).shape)
        if got != self.input_shape:
            raise ConfigError(f"image encoder: the image processor produces {got} but the CLIP model "
                              f"expects {self.input_shape}; give it a matching size and crop_size")


def build_encoder(*, pretrained: str | None = None, feature_layer: int = -2, drop_cls: bool = True,
                  seed: int | None = None, resample: str | None = None, anyres: bool = False,
                  grid_pinpoints: Any = None, anyres_pool: int | None = None, anyres_unpad: bool | None = None,
                  **tiny_config: Any) -> CLIPImageEncoder:
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
    - ``anyres``: LLaVA-NeXT any-resolution tiling (off by default): a base view plus the crops of the
      best of ``grid_pinpoints`` ([height, width] pairs in pixels, multiples of the image size; default
      LLaVA-NeXT's 1x2, 2x1, 2x2, 3x1, 1x3 crops), a newline token per feature row, padding rows and
      columns dropped (``anyres_unpad``, default true), each crop's patch grid average-pooled by
      ``anyres_pool`` (default 1, none; 2 as LLaVA-OneVision's 2x2 pooling). The token count then
      follows the image's aspect ratio.
    """
    unknown = sorted(set(tiny_config) - VISION_OPTIONS)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; known: pretrained, feature_layer, drop_cls, seed, "
                        f"resample, anyres, grid_pinpoints, anyres_pool, anyres_unpad, "
                        f"{', '.join(sorted(VISION_OPTIONS))}")
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
                            drop_cls=drop_cls, init_seed=init_seed, anyres=anyres, grid_pinpoints=grid_pinpoints,
                            anyres_pool=anyres_pool, anyres_unpad=anyres_unpad)


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


def _size_field(size: Any) -> int:
    """The side a processor resizes to (``shortest_edge``, else ``height``): LLaVA-NeXT's base view."""
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    return int(get("shortest_edge") or get("height"))


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

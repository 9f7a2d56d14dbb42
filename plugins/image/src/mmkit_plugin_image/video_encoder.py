"""The ``clip_video`` encoder: up to ``max_frames`` frames sampled uniformly from a clip, each encoded
by the image plugin's CLIP vision tower, optionally pooled in space and time, with a separator row
between frames (contract 1.1: a variable token count per input).

Tokens of a clip of ``F`` sampled frames: ``G = ceil(F / temporal_pool)`` frame groups of
``tokens_per_frame`` rows each, plus ``G - 1`` separator rows when ``separators`` is on. The
separator rows are zeros here and marked in :attr:`RaggedFeatures.separators`; a projector built
for a separator-using encoder puts its learned separator embedding there (as LLaVA-NeXT does with
``image_newline``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from PIL import Image

from mmkit.errors import ConfigError, InputError
from mmkit.modeling import ModalityEncoder
from mmkit.modeling.features import RaggedFeatures
from mmkit_plugin_image.encoder import CLIPImageEncoder, build_encoder
from mmkit_plugin_image.video_io import VideoClip, clip_from_frames, sample_indices

#: Bump when ``forward`` or ``preprocess`` changes in a way the options do not show (feature caches key on it).
_FEATURE_VERSION = 1
#: How frames are chosen; part of the identity.
SAMPLING = "uniform: all frames, or the middle frame of each of max_frames equal segments"


class VideoBatch(NamedTuple):
    """A collated batch: every clip's frames one after another, and each clip's frame count.
    (A named tuple: ``mmkit.modeling.features.move`` moves it, casting only ``frames``.)"""

    frames: torch.Tensor  # [sum of frame counts, 3, S, S]
    frame_counts: torch.Tensor  # int64 [clips]


class VideoEncoder(ModalityEncoder):
    """``[F, 3, S, S]`` frames per clip -> ``F' * tokens_per_frame (+ F' - 1 separators)`` rows."""

    num_tokens = None  # variable: follows the frame count
    input_shape = None  # any frame count
    uses_separators: ClassVar[bool] = True

    def __init__(self, frame_encoder: CLIPImageEncoder, *, max_frames: int, temporal_pool: int, spatial_pool: int,
                 separators: bool):
        super().__init__()
        for name, value in (("max_frames", max_frames), ("temporal_pool", temporal_pool),
                            ("spatial_pool", spatial_pool)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"video encoder: {name}={value!r}; use a whole number >= 1")
        if not isinstance(separators, bool):
            raise ConfigError(f"video encoder: separators={separators!r}; use true or false")
        frame_tokens = getattr(frame_encoder, "num_tokens", None)
        if not isinstance(frame_tokens, int):
            raise ConfigError("video encoder: each frame needs a fixed token count (turn anyres off for video)")
        self.frame_encoder = frame_encoder
        self.max_frames = max_frames
        self.temporal_pool = temporal_pool
        self.spatial_pool = spatial_pool
        self.separators = separators
        # An instance attribute too: with separators off there are no layout rows to fill.
        self.uses_separators = separators  # type: ignore[misc]
        self.frame_shape = tuple(frame_encoder.input_shape)
        self.output_dim = int(frame_encoder.output_dim)
        if spatial_pool > 1:
            grid = math.isqrt(frame_tokens)
            if frame_encoder.drop_cls is False or grid * grid != frame_tokens or grid % spatial_pool:
                raise ConfigError(f"video encoder: spatial_pool={spatial_pool} needs a square patch grid divisible "
                                  f"by it and drop_cls true; the frames have {frame_tokens} tokens "
                                  f"(drop_cls={frame_encoder.drop_cls})")
            self.tokens_per_frame = (grid // spatial_pool) ** 2
        else:
            self.tokens_per_frame = frame_tokens

    # -- contract 1.1 ----------------------------------------------------------------------------
    def preprocess(self, raw: Any) -> torch.Tensor:
        """A :class:`VideoClip` (what ``load_video`` returns), or frames in memory (a list of PIL
        images / ``H x W x C`` uint8 arrays, or a uint8 ``[T, H, W, C]`` array or tensor) ->
        ``FloatTensor[F, 3, S, S]``, ``F = min(T, max_frames)`` frames sampled uniformly."""
        clip = raw if isinstance(raw, VideoClip) else _clip_from_memory(raw)
        frames = clip.read(sample_indices(clip.num_frames, self.max_frames))
        return torch.stack([self.frame_encoder.preprocess(frame) for frame in frames])

    def collate(self, items: Sequence[torch.Tensor]) -> VideoBatch:
        for i, item in enumerate(items):
            if not isinstance(item, torch.Tensor) or item.dim() != 4 or tuple(item.shape[1:]) != self.frame_shape \
                    or item.shape[0] < 1:
                got = list(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
                raise TypeError(f"video encoder: item {i} is {got}, expected frames [F >= 1, "
                                f"{', '.join(map(str, self.frame_shape))}]")
        frames = torch.cat(list(items)) if items else torch.zeros(0, *self.frame_shape)
        return VideoBatch(frames, torch.tensor([len(item) for item in items], dtype=torch.long))

    def num_tokens_for(self, item: torch.Tensor) -> int:
        if not isinstance(item, torch.Tensor) or item.dim() != 4:
            got = list(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
            raise TypeError(f"video encoder: num_tokens_for takes one clip [F, 3, S, S], got {got}")
        groups = -(-int(item.shape[0]) // self.temporal_pool)
        return groups * self.tokens_per_frame + (groups - 1 if self.separators else 0)

    def blank(self, batch_size: int = 1) -> VideoBatch:
        """One all-zero frame per clip (the ablation and ZeRO-3's dummy pass)."""
        return self.collate([self.blank_item() for _ in range(batch_size)])

    def blank_item(self) -> torch.Tensor:
        """A clip of one all-zero frame."""
        return torch.zeros(1, *self.frame_shape)

    def forward(self, batch: VideoBatch) -> RaggedFeatures:
        frames, frame_counts = batch
        counts = [int(n) for n in frame_counts.tolist()]
        if sum(counts) != frames.shape[0]:
            raise ValueError(f"video batch: frame counts sum to {sum(counts)} but it holds {frames.shape[0]} frames")
        features = self.frame_encoder(frames)  # [frames, tokens, dim]
        if self.spatial_pool > 1:
            features = self._pool_space(features)
        rows: list[torch.Tensor] = []
        marks: list[torch.Tensor] = []
        per_clip: list[int] = []
        for clip in torch.split(features, counts):
            # Temporal pooling: the mean of each run of temporal_pool frames (the last run may be shorter).
            groups = [g.mean(dim=0) for g in torch.split(clip, self.temporal_pool)]
            for index, group in enumerate(groups):
                if index and self.separators:
                    rows.append(group.new_zeros(1, group.shape[-1]))
                    marks.append(torch.ones(1, dtype=torch.bool, device=group.device))
                rows.append(group)
                marks.append(torch.zeros(group.shape[0], dtype=torch.bool, device=group.device))
            per_clip.append(len(groups) * self.tokens_per_frame + (len(groups) - 1 if self.separators else 0))
        values = torch.cat(rows) if rows else features.new_zeros(0, self.output_dim)
        separators = torch.cat(marks) if self.separators and marks else None
        return RaggedFeatures(values, per_clip, separators)

    def identity(self) -> dict[str, Any]:
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "feature_version": _FEATURE_VERSION,
            "frame_encoder": self.frame_encoder.identity(),
            "max_frames": self.max_frames,
            "sampling": SAMPLING,
            "temporal_pool": self.temporal_pool,
            "spatial_pool": self.spatial_pool,
            "separators": self.separators,
            "tokens_per_frame": self.tokens_per_frame,
            "output_dim": self.output_dim,
        }

    # -- helpers ---------------------------------------------------------------------------------
    def _pool_space(self, features: torch.Tensor) -> torch.Tensor:
        """Average ``spatial_pool x spatial_pool`` neighbouring patches (LLaVA-Video pools video frames 2x2)."""
        n, tokens, dim = features.shape
        grid = math.isqrt(tokens)
        square = features.transpose(1, 2).reshape(n, dim, grid, grid)
        pooled = torch.nn.functional.avg_pool2d(square, self.spatial_pool)
        return pooled.flatten(2).transpose(1, 2)


def _clip_from_memory(raw: Any) -> VideoClip:
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu().numpy()
    if isinstance(raw, np.ndarray):
        if raw.dtype != np.uint8 or raw.ndim != 4 or raw.shape[-1] not in (1, 3, 4):
            raise InputError(f"video: expected uint8 frames [T, H, W, 1/3/4], got {raw.dtype} {list(raw.shape)}")
        raw = list(raw)
    if not isinstance(raw, (list, tuple)):
        raise InputError(f"video: preprocess expects a video clip or a list of frames, got {type(raw).__name__}")
    frames = []
    for i, frame in enumerate(raw):
        if isinstance(frame, np.ndarray):
            if frame.dtype != np.uint8 or frame.ndim not in (2, 3):
                raise InputError(f"video: frame {i} is {frame.dtype} {list(frame.shape)}, expected uint8 H x W [x C]")
            frame = Image.fromarray(frame[..., 0] if frame.ndim == 3 and frame.shape[2] == 1 else frame)
        if not isinstance(frame, Image.Image):
            raise InputError(f"video: frame {i} is a {type(frame).__name__}, expected a PIL image or uint8 array")
        frames.append(frame)
    if not frames:
        raise InputError("video: a clip needs at least one frame, got none")
    return clip_from_frames(frames)


def build_video_encoder(*, max_frames: int = 8, temporal_pool: int = 1, spatial_pool: int = 1,
                        separators: bool = True, **frame_options: Any) -> VideoEncoder:
    """Build the ``clip_video`` encoder.

    - ``max_frames``: frames sampled uniformly per clip (shorter clips keep all their frames);
    - ``temporal_pool``: average each run of this many sampled frames into one (1 = off);
    - ``spatial_pool``: average ``k x k`` neighbouring patches of each frame (1 = off);
    - ``separators``: a separator row between frames (a learned embedding in the projector);
    - every other option goes to the image plugin's ``clip`` encoder (``pretrained``,
      ``feature_layer``, ``drop_cls``, ``seed``, ``resample``, the ``CLIPVisionConfig`` sizes).
    """
    return VideoEncoder(build_encoder(**frame_options), max_frames=max_frames, temporal_pool=temporal_pool,
                        spatial_pool=spatial_pool, separators=separators)

"""The PointNet++ encoder's configuration (no torch: the plugin module and CLI listings read it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mmkit.errors import ConfigError

#: Small enough for CPU tests: 256 points -> 16 tokens of width 32.
TINY: dict[str, Any] = {
    "num_points": 256, "centres": [64, 16], "neighbours": [16, 16], "widths": [32, 64], "output_dim": 32,
}

#: The demo task's options (merged over TINY by mmkit): xyz only, 256 points -> 16 tokens of width
#: 128. Chosen so the frozen random-init features are linearly separable across the demo's shape
#: classes (linear probe on mean+max pooled tokens: about 0.96 held-out accuracy, see the tests).
DEMO: dict[str, Any] = {
    "num_points": 256, "in_channels": 3, "centres": [64, 16], "neighbours": [16, 16], "widths": [64, 128],
    "output_dim": 128, "invariant_features": True,
}

#: The configuration to pre-train or fine-tune for real data (LAMM/EPCL scale): 8192 points
#: (colour included) -> 256 tokens of width 768, plus two transformer layers over the tokens.
REAL: dict[str, Any] = {
    "num_points": 8192, "in_channels": 6, "centres": [1024, 256], "neighbours": [32, 32],
    "widths": [128, 256], "output_dim": 768, "transformer_layers": 2, "num_heads": 8,
}


@dataclasses.dataclass(frozen=True)
class PointNet2Config:
    """Options of :class:`mmkit_plugin_pointcloud.encoder.PointNet2Encoder`.

    - ``num_points``: points per cloud after preprocessing (FPS subsampling or repetition).
    - ``in_channels``: 3 (xyz only; colours dropped) or 6 (xyz + rgb; missing colours are zeros).
    - ``centres``: set-abstraction centres per level; the last is the number of output tokens.
    - ``neighbours``: kNN group size per level.
    - ``widths``: hidden width of each level's shared MLP.
    - ``output_dim``: token width.
    - ``invariant_features``: add rotation-invariant cues (each point's distance from the centroid,
      each neighbour's distance from its centre, each token centre's radius) to the inputs of the
      set-abstraction MLPs and the position embedding. Objects seen in arbitrary orientations are
      far easier to tell apart with them, especially by a frozen random-init encoder.
    - ``transformer_layers`` / ``num_heads``: optional pre-norm transformer over the tokens.
    The random-init ``seed`` is not an option here: mmkit passes it to the builder
    (:meth:`mmkit.modeling.PretrainedEncoder.build`).
    """

    num_points: int = 8192
    in_channels: int = 6
    centres: tuple[int, ...] = (1024, 256)
    neighbours: tuple[int, ...] = (32, 32)
    widths: tuple[int, ...] = (128, 256)
    output_dim: int = 512
    invariant_features: bool = True
    transformer_layers: int = 0
    num_heads: int = 4

    def __post_init__(self) -> None:
        for name in ("centres", "neighbours", "widths"):
            value = getattr(self, name)
            if isinstance(value, int):
                value = (value,)
            object.__setattr__(self, name, tuple(int(v) for v in value))
        self._validate()

    def _validate(self) -> None:
        def fail(reason: str) -> None:
            raise ConfigError(f"pointnet2 encoder: {reason}")

        if self.num_points < 1:
            fail(f"num_points must be positive, got {self.num_points}")
        if self.in_channels not in (3, 6):
            fail(f"in_channels must be 3 (xyz) or 6 (xyz + rgb), got {self.in_channels}")
        levels = len(self.centres)
        if levels == 0 or len(self.neighbours) != levels or len(self.widths) != levels:
            fail(f"centres, neighbours and widths need one entry per level, got "
                 f"{list(self.centres)}, {list(self.neighbours)}, {list(self.widths)}")
        available = self.num_points
        for level, (m, k, w) in enumerate(zip(self.centres, self.neighbours, self.widths)):
            if not 0 < m <= available:
                fail(f"level {level}: {m} centres from {available} points (need 1..{available})")
            if not 0 < k <= available:
                fail(f"level {level}: {k} neighbours from {available} points (need 1..{available})")
            if w < 1:
                fail(f"level {level}: width must be positive, got {w}")
            available = m
        if not isinstance(self.invariant_features, bool):
            fail(f"invariant_features must be true or false, got {self.invariant_features!r}")
        if self.output_dim < 1:
            fail(f"output_dim must be positive, got {self.output_dim}")
        if self.transformer_layers < 0:
            fail(f"transformer_layers must be >= 0, got {self.transformer_layers}")
        if self.transformer_layers and (self.num_heads < 1 or self.output_dim % self.num_heads):
            fail(f"output_dim {self.output_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def num_tokens(self) -> int:
        return self.centres[-1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PointNet2Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"pointnet2 encoder: unknown option(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")
        return cls(**values)

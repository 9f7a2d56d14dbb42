"""Built-in projectors: encoder features -> LLM embeddings.

Features come as ``Tensor[B, T, in_dim]`` (a fixed-size encoder) or as
:class:`~mmkit.modeling.features.RaggedFeatures` (a variable token count per input, contract 1.1).
The token-wise projectors (linear, MLP) map each row and keep the layout, so their output count is
the encoder's (``num_output_tokens``: the encoder's ``num_tokens``, ``None`` when it varies); the
resampler turns any number of rows into ``num_queries`` tokens.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmkit.modeling.features import RaggedFeatures

Features = torch.Tensor | RaggedFeatures


class _TokenWise(nn.Module):
    """A per-row map; with ``separator=True`` a learned embedding replaces the rows an encoder marks
    as layout (``RaggedFeatures.separators``), as LLaVA-NeXT's ``image_newline``."""

    def __init__(self, out_dim: int, num_tokens: int | None, separator: bool):
        super().__init__()
        self.num_output_tokens = num_tokens
        if separator:
            # LLaVA-NeXT initialises image_newline as randn / sqrt(hidden)
            self.separator = nn.Parameter(torch.randn(out_dim) / math.sqrt(out_dim))

    def map_rows(self, rows: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, features: Features) -> Features:
        if not isinstance(features, RaggedFeatures):
            return self.map_rows(features)
        out = features.map(self.map_rows)
        separator = getattr(self, "separator", None)
        if separator is None or features.separators is None:
            return out
        marks = features.separators.to(out.values.device).unsqueeze(-1)
        values = torch.where(marks, separator.to(out.values.dtype), out.values)
        return RaggedFeatures(values, out.counts, out.separators)


class LinearProjector(_TokenWise):
    """One linear map per token (LAMM)."""

    def __init__(self, *, in_dim: int, out_dim: int, num_tokens: int | None, separator: bool = False):
        super().__init__(out_dim, num_tokens, separator)
        self.proj = nn.Linear(in_dim, out_dim)

    def map_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.proj(rows)


class MLPProjector(_TokenWise):
    """``depth`` linear layers with GELU between them (LLaVA-1.5's ``mlp2x_gelu`` at depth 2)."""

    def __init__(self, *, in_dim: int, out_dim: int, num_tokens: int | None, depth: int = 2,
                 separator: bool = False):
        super().__init__(out_dim, num_tokens, separator)
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.mlp = nn.Sequential(*layers)

    def map_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.mlp(rows)


class ResamplerProjector(nn.Module):
    """Learned queries cross-attend to the features (mPLUG-Owl's visual abstractor, Flamingo's
    perceiver resampler): any number of input tokens becomes ``num_queries`` output tokens.

    :class:`RaggedFeatures` are padded and the padding masked out of the attention, so an input's
    output does not depend on the other inputs of its batch. ``separator`` is accepted and has no
    effect: the queries mix all rows, so there is no row layout to keep."""

    def __init__(self, *, in_dim: int, out_dim: int, num_tokens: int | None, num_queries: int = 32,
                 num_layers: int = 2, num_heads: int | None = None, separator: bool = False):
        super().__init__()
        heads = num_heads or max(1, min(8, out_dim // 64)) or 1
        while out_dim % heads:
            heads -= 1
        self.queries = nn.Parameter(torch.randn(num_queries, out_dim) * 0.02)
        self.input_proj = nn.Linear(in_dim, out_dim)
        self.layers = nn.ModuleList(
            nn.ModuleDict({
                "norm_q": nn.LayerNorm(out_dim),
                "norm_kv": nn.LayerNorm(out_dim),
                "attn": nn.MultiheadAttention(out_dim, heads, batch_first=True),
                "norm_ff": nn.LayerNorm(out_dim),
                "ff": nn.Sequential(nn.Linear(out_dim, 4 * out_dim), nn.GELU(), nn.Linear(4 * out_dim, out_dim)),
            })
            for _ in range(num_layers)
        )
        self.out_norm = nn.LayerNorm(out_dim)
        self.num_output_tokens = num_queries

    def forward(self, features: Features) -> torch.Tensor:
        padding = None
        if isinstance(features, RaggedFeatures):
            features, real = features.padded()
            if features.shape[1] == 0:  # a batch of inputs with no rows at all: one zero row each
                features, real = features.new_zeros(features.shape[0], 1, features.shape[2]), real.new_zeros(
                    real.shape[0], 1)
            # an input with no rows attends to one zero row (all keys masked would give NaN)
            real[:, 0] |= ~real.any(dim=1)
            padding = ~real
        kv = self.input_proj(features)
        x = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)
        for layer in self.layers:
            q = layer["norm_q"](x)
            k = layer["norm_kv"](kv)
            x = x + layer["attn"](q, k, k, key_padding_mask=padding, need_weights=False)[0]
            x = x + layer["ff"](layer["norm_ff"](x))
        return self.out_norm(x)

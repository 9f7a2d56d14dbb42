"""Built-in projectors: encoder features ``[B, T, in_dim]`` -> LLM embeddings ``[B, T', out_dim]``."""

from __future__ import annotations

import torch
from torch import nn


class LinearProjector(nn.Module):
    """One linear map per token (LAMM)."""

    def __init__(self, *, in_dim: int, out_dim: int, num_tokens: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.num_output_tokens = num_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


class MLPProjector(nn.Module):
    """``depth`` linear layers with GELU between them (LLaVA-1.5's ``mlp2x_gelu`` at depth 2)."""

    def __init__(self, *, in_dim: int, out_dim: int, num_tokens: int, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.mlp = nn.Sequential(*layers)
        self.num_output_tokens = num_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


class ResamplerProjector(nn.Module):
    """Learned queries cross-attend to the features (mPLUG-Owl's visual abstractor, Flamingo's
    perceiver resampler): any number of input tokens becomes ``num_queries`` output tokens."""

    def __init__(self, *, in_dim: int, out_dim: int, num_tokens: int, num_queries: int = 32,
                 num_layers: int = 2, num_heads: int | None = None):
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

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        kv = self.input_proj(features)
        x = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)
        for layer in self.layers:
            q = layer["norm_q"](x)
            k = layer["norm_kv"](kv)
            x = x + layer["attn"](q, k, k, need_weights=False)[0]
            x = x + layer["ff"](layer["norm_ff"](x))
        return self.out_norm(x)

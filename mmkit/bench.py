"""Throughput measurements shared by ``mmkit bench`` and ``benchmarks/`` (pytest-benchmark)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs
import torch

from mmkit.modeling.factory import build_encoder, build_projector
from mmkit.plugins import PluginHost


@attrs.frozen
class Components:
    modality: str
    encoder: Any
    projector: Any
    batch: torch.Tensor  # preprocessed inputs


def components(host: PluginHost, modality: str, *, batch_size: int, hidden: int = 64, projector: str | None = None,
               pretrained: str | None = None, seed: int = 0) -> Components:
    spec = host.modality(modality)
    torch.manual_seed(seed)
    encoder = build_encoder(host, spec, pretrained=pretrained).eval()
    proj = build_projector(host, projector or spec.projector, in_dim=encoder.output_dim, out_dim=hidden,
                           num_tokens=encoder.num_tokens).eval()
    # Random inputs of the preprocessed shape: throughput does not depend on content.
    batch = torch.randn(batch_size, *encoder.input_shape)
    return Components(modality, encoder, proj, batch)


def encode(c: Components) -> torch.Tensor:
    with torch.no_grad():
        return c.encoder(c.batch)


def project(c: Components, features: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return c.projector(features)


def items_per_second(fn: Callable[[], Any], items: int, *, min_seconds: float = 1.0, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    runs, start = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return runs * items / elapsed


def bench_modality(host: PluginHost, modality: str, *, batch_size: int, hidden: int, min_seconds: float,
                   pretrained: str | None = None, projector: str | None = None) -> dict[str, Any]:
    c = components(host, modality, batch_size=batch_size, hidden=hidden, pretrained=pretrained, projector=projector)
    features = encode(c)
    enc = items_per_second(lambda: encode(c), batch_size, min_seconds=min_seconds)
    proj = items_per_second(lambda: project(c, features), batch_size, min_seconds=min_seconds)
    return {
        "modality": modality,
        "encoder": host.modality(modality).encoder,
        "projector": projector or host.modality(modality).projector,
        "tokens_per_input": int(c.projector.num_output_tokens),
        "batch_size": batch_size,
        "encoder_items_per_s": enc,
        "projector_items_per_s": proj,
        # The share of a step an online encoder costs relative to projection: what a feature cache saves.
        "encoder_to_projector_time": proj / enc,
    }

"""Encoder and projector throughput per modality, found through the hooks (a third-party plugin's
modality is measured with no change to it).

Sizes: the ``tiny`` preset measures the encoders the demo trains (the modality's demo options,
projected to the demo LLM's width); the ``real`` preset measures each encoder's own
``EncoderSpec.presets`` (realistic random-init configurations the plugin names, e.g. a published encoder's shape),
projected to a 7B LLM's width.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from mmkit.bench.stats import Stat, interleaved, rate, ratio
from mmkit.errors import PluginError
from mmkit.modeling.encoder import ModalityEncoder
from mmkit.modeling.components import build_encoder, build_projector
from mmkit.plugins import PluginHost
from mmkit.specs import resolve


@attrs.frozen
class Components:
    modality: str
    encoder: Any
    projector: Any
    batch: Any  # preprocessed inputs, collated (a tensor for a fixed-size encoder)
    preset: str = "demo"


def preset_encoder(host: PluginHost, modality: str, preset: str) -> ModalityEncoder:
    """The modality's default encoder built from one of its plugin-named presets (random init)."""
    spec = host.modality(modality)
    enc_spec = host.encoder(spec.encoder)
    if preset not in enc_spec.presets:
        raise PluginError(f"encoder {spec.encoder!r} ({host.provider('encoder', spec.encoder)}) has no preset "
                          f"{preset!r}; it has {sorted(enc_spec.presets) or 'none'}")
    encoder = resolve(enc_spec.build)(pretrained=None, **dict(enc_spec.presets[preset]))
    if not isinstance(encoder, ModalityEncoder):
        raise PluginError(f"encoder {spec.encoder!r} preset {preset!r} built a {type(encoder).__name__}, "
                          "not a mmkit ModalityEncoder")
    return encoder


def components(host: PluginHost, modality: str, *, batch_size: int, hidden: int = 64, projector: str | None = None,
               pretrained: str | None = None, seed: int = 0, preset: str | None = None,
               device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Components:
    spec = host.modality(modality)
    torch.manual_seed(seed)
    if preset is not None:
        encoder = preset_encoder(host, modality, preset)
    else:
        encoder = build_encoder(host, spec, pretrained=pretrained)
    device = device or torch.device("cpu")
    encoder = encoder.eval().to(device=device, dtype=dtype)
    proj = build_projector(host, projector or spec.projector, in_dim=encoder.output_dim, out_dim=hidden,
                           num_tokens=encoder.num_tokens).eval().to(device=device, dtype=dtype)
    return Components(modality, encoder, proj, _inputs(encoder, batch_size, device, dtype), preset or "demo")


def _inputs(encoder: Any, batch_size: int, device: Any, dtype: torch.dtype, items: Sequence[Any] | None = None) -> Any:
    """Random inputs of the preprocessed shape (throughput does not depend on content). A variable-size
    encoder (no ``input_shape``), whose cost follows its inputs' sizes, gets ``items`` (its modality's
    demo inputs, :func:`demo_items`), cycled to ``batch_size``; without them its own
    ``blank(batch_size)``, the one batch every encoder can make."""
    from mmkit.modeling.features import move

    if encoder.input_shape is None:
        if items:
            return move(encoder.collate([items[i % len(items)] for i in range(batch_size)]), device, dtype)
        return move(encoder.blank(batch_size), device, dtype)
    return torch.randn(batch_size, *encoder.input_shape, device=device)


def demo_items(host: PluginHost, modality: str, encoder: Any, count: int, root: Path) -> list[Any]:
    """The first ``count`` inputs of the modality's demo task (written under ``root``), loaded and
    preprocessed by ``encoder``: inputs of the sizes the demo trains on. Empty without a demo task."""
    from mmkit.data.batching import make_preprocessor

    spec = host.modality(modality)
    if spec.demo is None:
        return []
    task = resolve(spec.demo.build)(root / modality, seed=0)
    preprocess = make_preprocessor(resolve(spec.load), encoder.preprocess, modality=modality)
    items: list[Any] = []
    for record in task.train:
        for key in spec.data_keys:
            paths = record.get(key)
            for path in [paths] if isinstance(paths, str) else paths or []:
                if len(items) < count:
                    items.append(preprocess(root / modality / path))
    return items


def _tokens_per_input(features: Any) -> float:
    """Feature rows per input: fixed ``[B, T, D]`` or ``RaggedFeatures`` (its mean count)."""
    counts = getattr(features, "counts", None)
    if counts is not None:
        return sum(counts) / max(len(counts), 1)
    return int(features.shape[1])


def encode(c: Components) -> torch.Tensor:
    with torch.no_grad():
        return c.encoder(c.batch)


def project(c: Components, features: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return c.projector(features)


def items_per_second(fn: Callable[[], Any], items: int, *, min_seconds: float = 1.0, warmup: int = 1) -> float:
    """One measurement (``mmkit.bench.stats.rate`` gives the repeated one)."""
    return rate(fn, items, rounds=1, min_seconds=min_seconds, warmup=warmup).median


def _sync_for(device: torch.device) -> Callable[[], None] | None:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def bench_components(host: PluginHost, modality: str, *, batch_sizes: Sequence[int], hidden: int, rounds: int,
                     min_seconds: float, preset: str | None = None, device: torch.device | None = None,
                     dtype: torch.dtype = torch.float32, pretrained: str | None = None) -> list[dict[str, Any]]:
    """Rows of encoder and projector throughput at each batch size: inputs/s and output tokens/s."""
    device = device or torch.device("cpu")
    sync = _sync_for(device)
    rows = []
    base = components(host, modality, batch_size=max(batch_sizes), hidden=hidden, preset=preset, device=device,
                      dtype=dtype, pretrained=pretrained)
    items: list[Any] = []
    if base.encoder.input_shape is None:
        with tempfile.TemporaryDirectory(prefix="mmkit-bench-inputs-") as tmp:
            items = demo_items(host, modality, base.encoder, max(batch_sizes), Path(tmp))
    inputs = "random" if base.encoder.input_shape is not None else "demo" if items else "blank"
    for size in batch_sizes:
        batch = base.batch[:size].to(dtype) if isinstance(base.batch, torch.Tensor) else \
            _inputs(base.encoder, size, device, dtype, items)
        c = attrs.evolve(base, batch=batch)
        features = encode(c)
        enc = rate(lambda c=c: encode(c), size, rounds=rounds, min_seconds=min_seconds, sync=sync, unit="inputs/s")
        proj = rate(lambda c=c, f=features: project(c, f), size, rounds=rounds, min_seconds=min_seconds, sync=sync,
                    unit="inputs/s")
        tokens_in = _tokens_per_input(features)
        tokens_out = _tokens_per_input(project(c, features))  # None num_output_tokens: one per input row
        rows.append({
            "modality": modality, "preset": c.preset, "inputs": inputs, "encoder": host.modality(modality).encoder,
            "projector": host.modality(modality).projector, "batch_size": size, "hidden": hidden,
            "dtype": str(dtype).removeprefix("torch."), "encoder_tokens": tokens_in, "tokens_per_input": tokens_out,
            "encoder_inputs_per_s": enc,
            "encoder_tokens_per_s": Stat([v * tokens_in for v in enc.values], "tokens/s"),
            "projector_inputs_per_s": proj,
            "projector_tokens_per_s": Stat([v * tokens_out for v in proj.values], "tokens/s"),
        })
    return rows


def wrapper_overhead(host: PluginHost, modality: str, *, batch_size: int, hidden: int, rounds: int,
                     min_seconds: float) -> Stat:
    """Throughput of the encoder + projector as mmkit's step calls them (``MultimodalLM.encode``:
    device/dtype handling, no-grad encoder, projector) over the same two modules called directly,
    interleaved: 1.0 means the wrapper costs nothing."""
    from mmkit.modeling.model import MultimodalLM

    c = components(host, modality, batch_size=batch_size, hidden=hidden)
    holder = _encode_only(MultimodalLM, modality, c.encoder, c.projector)

    def raw() -> Any:
        with torch.no_grad():
            features = c.encoder(c.batch)
        return c.projector(features)

    def wrapped() -> Any:
        return holder.encode(modality, c.batch)

    series = interleaved({"wrapped": wrapped, "raw": raw}, {"wrapped": batch_size, "raw": batch_size},
                         rounds=rounds, min_seconds=min_seconds)
    return ratio(series["wrapped"], series["raw"])


def _encode_only(cls: type, modality: str, encoder: Any, projector: Any) -> Any:
    """A ``MultimodalLM`` shell holding just one encoder and projector: its ``encode`` is the code
    the training step runs (no LLM is needed for it)."""
    shell = cls.__new__(cls)
    torch.nn.Module.__init__(shell)
    shell.encoders = torch.nn.ModuleDict({modality: encoder})
    shell.projectors = torch.nn.ModuleDict({modality: projector})
    shell.train_encoders = False
    shell.encode_chunk = getattr(cls, "encode_chunk", 32)  # the step's chunk size (MultimodalLM's default)
    return shell


def bench_modality(host: PluginHost, modality: str, *, batch_size: int, hidden: int, min_seconds: float,
                   pretrained: str | None = None, projector: str | None = None) -> dict[str, Any]:
    """One batch size, one round (kept for scripts written against the first ``mmkit bench``)."""
    c = components(host, modality, batch_size=batch_size, hidden=hidden, pretrained=pretrained, projector=projector)
    features = encode(c)
    enc = items_per_second(lambda: encode(c), batch_size, min_seconds=min_seconds)
    proj = items_per_second(lambda: project(c, features), batch_size, min_seconds=min_seconds)
    return {
        "modality": modality,
        "encoder": host.modality(modality).encoder,
        "projector": projector or host.modality(modality).projector,
        "tokens_per_input": _tokens_per_input(project(c, features)),
        "batch_size": batch_size,
        "encoder_items_per_s": enc,
        "projector_items_per_s": proj,
        "encoder_to_projector_time": proj / enc,
    }

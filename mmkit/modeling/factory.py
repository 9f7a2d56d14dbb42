"""Build encoders and projectors from their registered specs."""

from __future__ import annotations

from typing import Any

from torch import nn

from mmkit.errors import PluginError
from mmkit.modeling.encoder import ModalityEncoder
from mmkit.plugins import PluginHost
from mmkit.specs import ModalitySpec, resolve


def encoder_options(host: PluginHost, modality: ModalitySpec, *, encoder_name: str | None = None,
                    pretrained: str | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options an encoder is built with: tiny config + demo options (random init only), then
    explicit options."""
    spec = host.encoder(encoder_name or modality.encoder)
    merged: dict[str, Any] = {}
    if pretrained is None:
        merged.update(spec.tiny)
        if modality.demo is not None and (encoder_name in (None, modality.encoder)):
            merged.update(modality.demo.encoder_options)
    merged.update(options or {})
    return merged


def build_encoder(host: PluginHost, modality: ModalitySpec, *, encoder_name: str | None = None,
                  pretrained: str | None = None, options: dict[str, Any] | None = None) -> ModalityEncoder:
    name = encoder_name or modality.encoder
    spec = host.encoder(name)
    if spec.modality != modality.name:
        raise PluginError(f"encoder {name!r} is for modality {spec.modality!r}, not {modality.name!r}")
    opts = encoder_options(host, modality, encoder_name=name, pretrained=pretrained, options=options)
    try:
        encoder = resolve(spec.build)(pretrained=pretrained, **opts)
    except TypeError as exc:
        raise PluginError(f"encoder {name!r} ({host.provider('encoder', name)}): bad options {opts}: {exc}") from exc
    if not isinstance(encoder, ModalityEncoder):
        raise PluginError(f"encoder {name!r} built a {type(encoder).__name__}, not a mmkit ModalityEncoder")
    for attr in ("num_tokens", "output_dim", "input_shape"):
        if not hasattr(encoder, attr):
            raise PluginError(f"encoder {name!r} does not set {attr}")
    return encoder


def build_projector(host: PluginHost, name: str, *, in_dim: int, out_dim: int, num_tokens: int,
                    options: dict[str, Any] | None = None) -> nn.Module:
    spec = host.projector(name)
    try:
        projector = resolve(spec.build)(in_dim=in_dim, out_dim=out_dim, num_tokens=num_tokens, **(options or {}))
    except TypeError as exc:
        raise PluginError(f"projector {name!r}: bad options {options}: {exc}") from exc
    if not hasattr(projector, "num_output_tokens"):
        raise PluginError(f"projector {name!r} does not set num_output_tokens")
    return projector

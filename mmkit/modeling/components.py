"""Build encoders and projectors from their registered specs."""

from __future__ import annotations

from typing import Any

from torch import nn

from mmkit.errors import MmkitError, PluginError
from mmkit.modeling.encoder import DEFAULT_SEED, ModalityEncoder
from mmkit.modeling.features import RaggedFeatures
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
    if pretrained is None and takes_seed(spec.build):
        # Random init is seeded (the run passes its seed), and the seed is recorded with the options:
        # a reload rebuilds the same weights (same identity) before the saved ones are loaded.
        merged.setdefault("seed", DEFAULT_SEED)
    elif "seed" in merged and not takes_seed(spec.build):
        del merged["seed"]  # the run's seed, offered to every builder; this one has no random init to seed
    return merged


def takes_seed(build: Any) -> bool:
    """Whether an encoder builder accepts ``seed`` (by name or through ``**options``)."""
    import inspect

    try:
        params = inspect.signature(resolve(build)).parameters.values()
    except (TypeError, ValueError, PluginError):
        return False
    return any(p.name == "seed" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def build_encoder(host: PluginHost, modality: ModalitySpec, *, encoder_name: str | None = None,
                  pretrained: str | None = None, options: dict[str, Any] | None = None) -> ModalityEncoder:
    name = encoder_name or modality.encoder
    spec = host.encoder(name)
    if spec.modality != modality.name:
        raise PluginError(f"encoder {name!r} is for modality {spec.modality!r}, not {modality.name!r}")
    opts = encoder_options(host, modality, encoder_name=name, pretrained=pretrained, options=options)
    plugin = host.provider("encoder", name)
    where = f"plugin {plugin}, modality {modality.name}, encoder {name}"
    try:
        encoder = resolve(spec.build)(pretrained=pretrained, **opts)
    except TypeError as exc:
        raise PluginError(f"encoder {name!r} ({plugin}): bad options {opts}: {exc}") from exc
    except MmkitError:
        raise
    except Exception as exc:  # the plugin's own bug: name it rather than show its traceback
        raise PluginError(f"{where}: building the encoder raised {type(exc).__name__}: "
                          f"{' '.join(str(exc).split())}") from exc
    if not isinstance(encoder, ModalityEncoder):
        raise PluginError(f"{where}: the builder returned a {type(encoder).__name__}, not a mmkit ModalityEncoder")
    for attr in ("num_tokens", "output_dim", "input_shape"):
        if not hasattr(encoder, attr):
            raise PluginError(f"{where}: the encoder does not set {attr}")
    if type(encoder).identity is ModalityEncoder.identity:
        raise PluginError(f"{where}: {type(encoder).__qualname__} does not implement identity() (checkpoints and "
                          "the feature cache need it; PretrainedEncoder provides one)")
    if type(encoder).preprocess is ModalityEncoder.preprocess:
        raise PluginError(f"{where}: {type(encoder).__qualname__} does not implement preprocess()")
    _check_variable(encoder, where)
    # Named in the errors of load / preprocess / encode (mmkit.data.batching, ModalityEncoder.__call__).
    encoder._mmkit_origin = {"plugin": plugin, "modality": modality.name, "encoder": name}
    return encoder


def _positive_int(value: Any) -> bool:
    import operator

    try:
        return not isinstance(value, bool) and operator.index(value) > 0
    except TypeError:
        return False


def _check_variable(encoder: ModalityEncoder, where: str) -> None:
    """Contract 1.1: ``num_tokens`` / ``input_shape`` may be ``None`` (inputs of any size), and then
    the methods the defaults cannot provide must be the encoder's own."""
    cls = type(encoder)
    num_tokens, shape = encoder.num_tokens, encoder.input_shape
    if num_tokens is not None and not _positive_int(num_tokens):
        raise PluginError(f"{where}: num_tokens must be a positive int, or None for a variable count; got {num_tokens!r}")
    if shape is not None and not isinstance(shape, (tuple, list)):
        raise PluginError(f"{where}: input_shape must be a tuple, or None for inputs of any shape; got {shape!r}")
    if num_tokens is None and cls.num_tokens_for is ModalityEncoder.num_tokens_for:
        raise PluginError(f"{where}: num_tokens is None (a variable token count) but {cls.__qualname__} does not "
                          "implement num_tokens_for(item), the count the prompt reserves for each input")
    if shape is None and cls.blank is ModalityEncoder.blank and cls.blank_input is ModalityEncoder.blank_input:
        raise PluginError(f"{where}: input_shape is None (inputs of any shape) but {cls.__qualname__} does not "
                          "implement blank(batch_size), the blank batch of the ablation and the ZeRO-3 dummy pass")


def build_projector(host: PluginHost, name: str, *, in_dim: int, out_dim: int, num_tokens: int | None,
                    options: dict[str, Any] | None = None, separator: bool = False) -> nn.Module:
    """``num_tokens``: the encoder's (``None`` for a variable count). ``separator``: the encoder marks
    layout rows (``uses_separators``), so the projector is built with ``separator=True`` and learns
    their embedding."""
    spec = host.projector(name)
    extra = {"separator": True} if separator else {}
    try:
        projector = resolve(spec.build)(in_dim=in_dim, out_dim=out_dim, num_tokens=num_tokens, **extra,
                                        **(options or {}))
    except TypeError as exc:
        if separator and "separator" in str(exc):
            raise PluginError(f"projector {name!r} does not take separator=True, which the encoder needs (it marks "
                              f"layout rows: uses_separators): {exc}") from exc
        raise PluginError(f"projector {name!r}: bad options {options}: {exc}") from exc
    if not hasattr(projector, "num_output_tokens"):
        raise PluginError(f"projector {name!r} does not set num_output_tokens")
    if projector.num_output_tokens is None and num_tokens is not None:
        raise PluginError(f"projector {name!r}: num_output_tokens is None for an encoder of a fixed {num_tokens} "
                          "tokens per input")
    return projector


def check_encoders(host: PluginHost) -> list[str]:
    """``plugins check --deep``: build each registered encoder once at its tiny size and check what it
    declares: it builds, implements ``identity()`` (a JSON object), and encodes a blank batch of 2 into
    ``[2, num_tokens, output_dim]`` finite features (``RaggedFeatures`` of 2 inputs when variable). Each problem names the plugin and modality."""
    import json

    import torch

    problems = []
    for name in host.encoders():
        spec = host.encoder(name)
        where = f"{host.provider('encoder', name)}: encoder {name} (modality {spec.modality})"
        try:
            if spec.modality not in host.modalities():
                continue  # a dangling reference: host.check() reports it
            encoder = build_encoder(host, host.modality(spec.modality), encoder_name=name).eval()
            ident = encoder.identity()
            if not isinstance(ident, dict) or not ident:
                raise PluginError(f"identity() returned {type(ident).__name__}, declared a non-empty dict")
            json.dumps(ident)
            with torch.no_grad():
                out = encoder(encoder.blank(2))
            values = out.values if isinstance(out, RaggedFeatures) else out
            if not bool(torch.isfinite(values).all()):
                raise PluginError("encoding a blank batch gave NaN or inf features")
        except Exception as exc:  # every fault, named: this is the check
            message = " ".join(str(exc).split())
            if not isinstance(exc, PluginError):
                message = f"{where}: {type(exc).__name__}: {message}"
            elif not message.startswith("plugin "):  # the factory's messages already name the plugin
                message = f"{where}: {message}"
            problems.append(message)
    return problems

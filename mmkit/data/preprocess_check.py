"""``mmkit data validate`` runs each input through its modality's ``load`` *and* the ``preprocess`` of
the encoder the run would use (by default the modality's tiny encoder; with ``--config`` / ``--set``
the run's encoder, its pretrained weights and options), so a file that validates does not fail at
training, and a variable-size input is counted with the encoder that will encode it.

The default check is named by a lazy reference, ``"mmkit.data.preprocess_check:<modality>"``; a
check of a chosen encoder is a :class:`Decoder`, a small picklable object. Either resolves in the
validator's process-pool workers like a plugin's ``load``: the encoder is built once per process
(seeded; only its ``preprocess`` and ``num_tokens_for`` are used).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs


def _dict(value: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict(value or {})


@attrs.frozen
class EncoderChoice:
    """The encoder and projector a run uses for one modality (``mmkit train``'s ``encoders``,
    ``encoder_pretrained``, ``encoder_options``, ``projectors``, ``projector_options``); the default,
    all unset, is the modality's own encoder and projector in their tiny configuration."""

    encoder: str | None = None
    pretrained: str | None = None
    options: dict[str, Any] = attrs.field(factory=dict, converter=_dict, hash=False)
    projector: str | None = None
    projector_options: dict[str, Any] = attrs.field(factory=dict, converter=_dict, hash=False)


_DEFAULT = EncoderChoice()


def encoder_choices(modalities: Iterable[str], *, encoders: Mapping[str, str] | None = None,
                    encoder_pretrained: Mapping[str, str] | None = None,
                    encoder_options: Mapping[str, Mapping[str, Any]] | None = None,
                    projectors: Mapping[str, str] | None = None,
                    projector_options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, EncoderChoice]:
    """Per modality, the :class:`EncoderChoice` of a run's settings (each mapping keyed by modality,
    as in the train config)."""
    return {m: EncoderChoice(encoder=(encoders or {}).get(m), pretrained=(encoder_pretrained or {}).get(m),
                             options=(encoder_options or {}).get(m), projector=(projectors or {}).get(m),
                             projector_options=(projector_options or {}).get(m))
            for m in modalities}


_CHECKS: dict[Any, Any] = {}
_ENCODERS: dict[Any, Any] = {}  # the encoder behind each check (num_tokens_for counts inputs)
_PROJECTORS: dict[Any, Any] = {}  # and its projector (a fixed output count wins over num_tokens_for)


def _key(modality: str, choice: EncoderChoice | None) -> Any:
    # the default keeps the plain modality name as its key (the lazy reference's attribute)
    return modality if choice is None or choice == _DEFAULT else (modality, choice)


def decoder(spec: Any, choice: EncoderChoice | None = None, *, counting: bool = False) -> Any:
    """What the validator decodes a file of modality ``spec`` with: the load + preprocess check (the
    lazy reference for the default encoder, else or when ``counting`` a :class:`Decoder`, which can
    also count) for an installed plugin, else (a plugin given as callables, a test's own host) ``load``."""
    from mmkit.plugins import get_host

    if not isinstance(spec.load, str) or get_host().modalities().get(spec.name) != spec:
        return spec.load
    if _key(spec.name, choice) == spec.name and not counting:
        return f"{__name__}:{spec.name}"
    return Decoder(spec.name, choice)


@attrs.frozen
class Decoder:
    """``path -> preprocessed input`` with the encoder of ``choice`` (picklable for the validator's
    process pool); :meth:`count` also gives a variable-size input's token count."""

    modality: str
    choice: EncoderChoice | None = None

    def __call__(self, path: Any) -> Any:
        return check(self.modality, choice=self.choice)(Path(path))

    def count(self, path: Any) -> int | None:
        """Preprocess the file and return the prompt slots it gets; ``None`` for a fixed-size encoder
        (the prompt builder knows its count)."""
        item = self(path)
        key = _key(self.modality, self.choice)
        if _ENCODERS[key].num_tokens is not None:
            return None
        return _tokens(self.modality, None, self.choice, item)


def encoder_for(modality: str, host: Any = None, choice: EncoderChoice | None = None) -> Any:
    """The encoder of ``choice`` for ``modality`` (built once per process; the random state is kept)."""
    key = _key(modality, choice)
    if key not in _ENCODERS:
        import torch

        from mmkit.modeling.components import build_encoder
        from mmkit.plugins import get_host

        host = host or get_host()
        choice = choice or _DEFAULT
        with torch.random.fork_rng(devices=[]):
            _ENCODERS[key] = build_encoder(host, host.modality(modality), encoder_name=choice.encoder,
                                           pretrained=choice.pretrained, options=dict(choice.options))
    return _ENCODERS[key]


def projector_for(modality: str, host: Any = None, choice: EncoderChoice | None = None) -> Any:
    """The projector of ``choice`` on top of :func:`encoder_for`'s encoder, as the assembler builds it
    (width 8: only its output count is used)."""
    key = _key(modality, choice)
    if key not in _PROJECTORS:
        _PROJECTORS[key] = build_projector_for(modality, encoder_for(modality, host, choice), host, choice)
    return _PROJECTORS[key]


def build_projector_for(modality: str, encoder: Any, host: Any = None, choice: EncoderChoice | None = None) -> Any:
    import torch

    from mmkit.modeling.components import build_projector
    from mmkit.plugins import get_host

    host = host or get_host()
    choice = choice or _DEFAULT
    with torch.random.fork_rng(devices=[]):
        return build_projector(host, choice.projector or host.modality(modality).projector, in_dim=encoder.output_dim,
                               out_dim=8, num_tokens=encoder.num_tokens, options=dict(choice.projector_options),
                               separator=bool(getattr(encoder, "uses_separators", False)))


def check(modality: str, host: Any = None, choice: EncoderChoice | None = None) -> Any:
    """``path -> tensor`` through ``load`` and the chosen encoder's ``preprocess`` (errors as in
    training: an :class:`~mmkit.errors.InputError` naming the file, the plugin and the reason)."""
    key = _key(modality, choice)
    if key not in _CHECKS:
        from mmkit.data.batching import make_preprocessor
        from mmkit.plugins import get_host
        from mmkit.specs import resolve

        host = host or get_host()
        encoder = encoder_for(modality, host, choice)
        _CHECKS[key] = make_preprocessor(resolve(host.modality(modality).load), encoder.preprocess)
    return _CHECKS[key]


def _tokens(modality: str, host: Any, choice: EncoderChoice | None, item: Any) -> int:
    from mmkit.modeling.encoder import tokens_per_input

    return tokens_per_input(encoder_for(modality, host, choice), projector_for(modality, host, choice), item)


def count_tokens(modality: str, path: Any, host: Any = None, choice: EncoderChoice | None = None) -> int:
    """The prompt slots one input file of ``modality`` gets with the chosen encoder and projector:
    ``load``, ``preprocess``, then ``tokens_per_input`` (the projector's fixed count, else the
    encoder's ``num_tokens_for``; errors as in training)."""
    item = check(modality, host, choice)(Path(path))
    return _tokens(modality, host, choice, item)


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return check(name)


__all__ = ["Decoder", "EncoderChoice", "build_projector_for", "check", "count_tokens", "decoder", "encoder_choices",
           "encoder_for", "projector_for"]

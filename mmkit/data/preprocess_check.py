"""``mmkit data validate`` runs each input through its modality's ``load`` *and* the ``preprocess`` of
the modality's tiny encoder, so a file that validates does not fail at training.

The check is named by a lazy reference, ``"mmkit.data.preprocess_check:<modality>"``, so the
validator's process-pool workers can resolve it like a plugin's ``load``: the attribute lookup
builds the tiny encoder once per process (seeded; only its ``preprocess`` is used).
"""

from __future__ import annotations

from typing import Any

_CHECKS: dict[str, Any] = {}
_ENCODERS: dict[str, Any] = {}  # the tiny encoder behind each check (num_tokens_for counts inputs)


def decoder(spec: Any) -> Any:
    """What the validator decodes a file of modality ``spec`` with: the load + preprocess check's lazy
    reference for an installed plugin, else (a plugin given as callables, a test's own host) ``load``."""
    from mmkit.plugins import get_host

    if not isinstance(spec.load, str) or get_host().modalities().get(spec.name) != spec:
        return spec.load
    return f"{__name__}:{spec.name}"


def check(modality: str, host: Any = None) -> Any:
    """``path -> tensor`` through ``load`` and the tiny encoder's ``preprocess`` (errors as in training:
    an :class:`~mmkit.errors.InputError` naming the file, the plugin and the reason)."""
    if modality not in _CHECKS:
        from mmkit.data.batching import make_preprocessor
        from mmkit.modeling.components import build_encoder
        from mmkit.plugins import get_host
        from mmkit.specs import resolve

        host = host or get_host()
        spec = host.modality(modality)
        encoder = build_encoder(host, spec)
        _CHECKS[modality] = make_preprocessor(resolve(spec.load), encoder.preprocess)
        _ENCODERS[modality] = encoder
    return _CHECKS[modality]


def count_tokens(modality: str, path: Any, host: Any = None) -> int:
    """The tokens one input file of ``modality`` becomes with the tiny encoder: ``load``, ``preprocess``,
    then ``num_tokens_for`` (a variable-size modality's count for the prompt; errors as in training)."""
    from pathlib import Path

    item = check(modality, host)(Path(path))
    return int(_ENCODERS[modality].num_tokens_for(item))


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return check(name)


__all__ = ["check", "count_tokens", "decoder"]

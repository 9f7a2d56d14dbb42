"""Decoding options shared by ``LoadedModel.generate``, ``mmkit chat`` and evaluation.

Cheap to import (no torch): the CLI validates options before loading a model.
"""

from __future__ import annotations

from typing import Any

import attrs

from mmkit.errors import ConfigError


def _stop_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@attrs.frozen
class GenerationOptions:
    """How to pick each next token. The default is greedy decoding.

    - ``sample``: draw tokens (with ``temperature``, ``top_p``, ``top_k``) instead of taking the
      most likely one; ``seed`` makes a draw reproducible.
    - ``num_beams`` > 1: beam search (greedy or sampled beams).
    - ``repetition_penalty`` > 1 discourages repeating tokens already generated (the prompt is
      passed as embeddings, so its own tokens are not counted).
    - ``stop``: strings that end the answer (cut from it); the end-of-turn and EOS tokens always do.
    """

    max_new_tokens: int = 32
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = attrs.field(default=(), converter=_stop_tuple)
    seed: int | None = None

    def __attrs_post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens!r}: give a whole number of at least 1")
        if not self.temperature > 0:
            problems.append(f"temperature={self.temperature!r}: must be above 0 (use greedy decoding, the "
                            "default, for the most likely answer)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p!r}: must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k={self.top_k!r}: a whole number, 0 for no limit")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            problems.append(f"num_beams={self.num_beams!r}: a whole number of at least 1")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty={self.repetition_penalty!r}: must be above 0 (1 = none)")
        if not self.sample:
            changed = [name for name, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0))
                       if getattr(self, name) != default]
            if changed:
                problems.append(f"{', '.join(changed)} {'applies' if len(changed) == 1 else 'apply'} only when "
                                "sampling: turn sampling on (sample=True, --sample)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop={self.stop!r}: give non-empty strings")
        if problems:
            raise ConfigError("generation options: " + "; ".join(problems))

    def hf_kwargs(self, *, stop_strings: bool = True) -> dict[str, Any]:
        """Keyword arguments for transformers' ``generate`` (``stop_strings=False``: leave the stop
        strings to the caller's own stopping criterion)."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.sample,
                                  "num_beams": self.num_beams, "repetition_penalty": self.repetition_penalty}
        if self.sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.stop and stop_strings:
            kwargs["stop_strings"] = list(self.stop)
        return kwargs

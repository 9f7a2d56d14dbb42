"""Does the tokenizer know the answer words? A word-level tokenizer (the embedded demo's, 47 words)
maps every other word to its unknown token, and the model then learns to answer ``<unk>``: training
"works" and the answers are garbage. ``mmkit data validate`` and ``mmkit train`` warn about it."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

_WORDS = re.compile(r"\w+")
#: Answers scanned per check (the warning is about the vocabulary, not every record).
MAX_TEXTS = 2000


def unknown_answer_words(tokenizer: Any, answers: Iterable[str], *, limit: int = MAX_TEXTS) -> Counter[str]:
    """Words of the first ``limit`` answers that the tokenizer turns into its unknown token, counted."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return Counter()
    unknown: Counter[str] = Counter()
    seen: set[str] = set()
    for n, text in enumerate(answers):
        if n >= limit:
            break
        for word in _WORDS.findall(text):
            if word in seen:
                if word in unknown:
                    unknown[word] += 1
                continue
            seen.add(word)
            # (a byte-level BPE never yields its unk, often the end-of-text token, for plain words)
            if unk in tokenizer(word, add_special_tokens=False)["input_ids"]:
                unknown[word] += 1
    return unknown


def sample_answers(samples: Iterable[Any]) -> Iterable[str]:
    """The assistant turns of samples (:class:`mmkit.records.Sample`)."""
    for sample in samples:
        for turn in sample.turns:
            if turn.role != "user" and turn.role != "system":
                yield turn.text


def unknown_words_warning(tokenizer: Any, samples: Iterable[Any]) -> str | None:
    """A one-line warning when answer words map to the tokenizer's unknown token, else ``None``."""
    unknown = unknown_answer_words(tokenizer, sample_answers(samples))
    if not unknown:
        return None
    words = ", ".join(repr(w) for w in sorted(unknown)[:8])
    return (f"the tokenizer maps {len(unknown)} answer word(s) to its unknown token {tokenizer.unk_token!r} "
            f"({words}{', ...' if len(unknown) > 8 else ''}): the model cannot learn to say them. Use an LLM "
            "whose tokenizer covers your text (--llm tiny ships a general byte-level one for offline runs)")

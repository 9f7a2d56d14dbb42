"""Metric implementations, following LAMM's definitions (see docs): pure Python, no torch."""

from __future__ import annotations

import re
from collections.abc import Sequence

_WORD = re.compile(r"[a-z0-9]+")
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _contains(answer: str, label: str) -> bool:
    """Whole-word containment: 'a 3' contains '3', 'cube' is not found in 'cubes' -> handled by
    also accepting a plural 's'."""
    words = _words(answer)
    target = _words(label)
    if not target:
        return False
    n = len(target)
    for i in range(len(words) - n + 1):
        window = words[i:i + n]
        if window == target or (window[:-1] == target[:-1] and window[-1] == target[-1] + "s"):
            return True
    return False


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Classification accuracy as LAMM scores it: correct when the label appears in the answer.
    An answer naming several different labels is not credited (it would game the metric)."""
    labels = sorted(set(references))
    hits = 0
    for pred, ref in zip(predictions, references, strict=True):
        named = [label for label in labels if _contains(pred, label)]
        hits += int(named == [ref])
    return {"accuracy": hits / len(references) if references else 0.0}


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    hits = sum(p.strip().lower() == r.strip().lower() for p, r in zip(predictions, references, strict=True))
    return {"exact_match": hits / len(references) if references else 0.0}


_MC_PATTERNS = (re.compile(r"the answer is \(?([A-Z])\)?", re.I), re.compile(r"ANSWER:\s*\(?([A-Z])\)?"),
                re.compile(r"\(([A-Z])\)"))


def multiple_choice_letter(answer: str) -> str | None:
    """LAMM's cascade: 'The answer is (X)', then 'ANSWER: X', then '(X)'."""
    for pattern in _MC_PATTERNS:
        match = pattern.search(answer)
        if match:
            return match.group(1).upper()
    stripped = answer.strip()
    if len(stripped) == 1 and stripped.isalpha():
        return stripped.upper()
    return None


def multiple_choice_accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    hits = sum(multiple_choice_letter(p) == r.strip().upper() for p, r in zip(predictions, references, strict=True))
    return {"mc_accuracy": hits / len(references) if references else 0.0}


def first_count(answer: str) -> float | None:
    for token in re.findall(r"-?\d+(?:\.\d+)?|[a-zA-Z]+", answer):
        if token[0].isdigit() or token[0] == "-":
            return float(token)
        if token.lower() in _NUMBER_WORDS:
            return float(_NUMBER_WORDS[token.lower()])
    return None


def count_mae(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Counting: the first integer or number word in the answer; mean absolute error. An answer
    with no number counts as 0 (as LAMM)."""
    errors = [abs((first_count(p) or 0.0) - float(r)) for p, r in zip(predictions, references, strict=True)]
    return {"mae": sum(errors) / len(errors) if errors else 0.0}

"""Reading answers the way LAMM writes them: words, labels, numbers, points and boxes in free text.

Coordinates are parsed from ``[...]`` / ``(...)`` groups, or, when the answer has no group, from all
the numbers in the text; groups are chunked into points (2 numbers), 2-D boxes ``[x1, y1, x2, y2]``
(4) or 3-D boxes ``[cx, cy, cz, dx, dy, dz]`` (6). Each box remembers the text before it (since the
previous box), where LAMM's answers name its class: "a dog [0.1, 0.2, 0.5, 0.6] and a cat [...]".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import attrs

_WORD = re.compile(r"[a-z0-9]+")
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
_GROUP = re.compile(r"[\[(]([^\[\]()]*)[\])]")
#: Words a count may be written as (LAMM's counting parser reads number words too).
NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
NUMBER_WORDS.update({"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
                     "ninety": 90, "hundred": 100})


def words(text: str) -> list[str]:
    """Lower-case alphanumeric words: punctuation and case never decide a match."""
    return _WORD.findall(text.lower())


def _forms(word: str) -> tuple[str, ...]:
    # The plural is accepted as the same label (LAMM credits lemmas): cube/cubes, box/boxes.
    return (word, word + "s", word + "es")


def phrase_spans(text_words: Sequence[str], phrase: str) -> list[tuple[int, int]]:
    """Word spans ``[i, j)`` where ``phrase`` occurs as whole words (its last word may be plural)."""
    target = words(phrase)
    n = len(target)
    if not n:
        return []
    spans = []
    for i in range(len(text_words) - n + 1):
        window = text_words[i:i + n]
        if window[:-1] == target[:-1] and window[-1] in _forms(target[-1]):
            spans.append((i, i + n))
    return spans


def named(text: str, vocabulary: Iterable[str]) -> set[str]:
    """The phrases of ``vocabulary`` that ``text`` names. A phrase found only inside a longer named
    phrase does not count ("traffic light" names "traffic light", not also "light")."""
    text_words = words(text)
    spans = {phrase: phrase_spans(text_words, phrase) for phrase in set(vocabulary)}
    all_spans = [s for found in spans.values() for s in found]
    out = set()
    for phrase, found in spans.items():
        for i, j in found:
            if not any(a <= i and j <= b and (b - a) > (j - i) for a, b in all_spans):
                out.add(phrase)
                break
    return out


def last_named(text: str, vocabulary: Iterable[str]) -> str | None:
    """The vocabulary phrase named last in ``text`` (the class a box that follows belongs to)."""
    text_words = words(text)
    best: tuple[int, int, str] | None = None
    for phrase in set(vocabulary):
        for i, j in phrase_spans(text_words, phrase):
            # latest end wins; on a tie the longer phrase ("traffic light" over "light")
            key = (j, j - i, phrase)
            if best is None or key[:2] > best[:2]:
                best = key
    return best[2] if best else None


def first_number(text: str) -> float | None:
    """The first number written in digits or words ("3", "3.5", "three"); ``None`` if none."""
    # a minus counts only as a sign ("-2"), not as a range's dash ("3-4")
    for match in re.finditer(r"(?<![\w.])-\d+(?:\.\d+)?|\d+(?:\.\d+)?|[a-zA-Z]+", text):
        token = match.group(0)
        if token[0].isdigit() or token[0] == "-":
            return float(token)
        if token.lower() in NUMBER_WORDS:
            return float(NUMBER_WORDS[token.lower()])
    return None


@attrs.frozen
class Group:
    """Numbers read from one bracketed group, with the text since the previous group."""

    numbers: tuple[float, ...]
    before: str


def number_groups(text: str) -> list[Group]:
    """The bracketed numeric groups of ``text`` in order; when it has none, one group holding every
    number in the text (LAMM's fallback). Groups without numbers ("(see above)") are skipped."""
    groups: list[Group] = []
    last = 0
    for match in _GROUP.finditer(text):
        numbers = tuple(float(n) for n in _NUMBER.findall(match.group(1)))
        if numbers:
            groups.append(Group(numbers, text[last:match.start()]))
            last = match.end()
    if groups:
        return groups
    numbers = tuple(float(n) for n in _NUMBER.findall(text))
    return [Group(numbers, text)] if numbers else []


def chunks(group: Group, size: int) -> list[tuple[float, ...]]:
    """Split a group into consecutive ``size``-number pieces; a short remainder is dropped."""
    n = len(group.numbers) - len(group.numbers) % size
    return [group.numbers[i:i + size] for i in range(0, n, size)]


def points(text: str) -> list[tuple[float, float]]:
    """``(x, y)`` / ``[x, y]`` points in order. Only two-number groups are points; an answer with no
    bracketed group has its numbers read in pairs."""
    found = []
    has_brackets = any(_NUMBER.search(m.group(1)) for m in _GROUP.finditer(text))
    for group in number_groups(text):
        if has_brackets and len(group.numbers) != 2:
            continue
        found += [(p[0], p[1]) for p in chunks(group, 2)]
    return found


def first_point(text: str) -> tuple[float, float] | None:
    """The first point of an answer: a two-number group, or the centre of a four-number box."""
    for group in number_groups(text):
        if len(group.numbers) == 4:
            x1, y1, x2, y2 = normalise_box(group.numbers)
            return ((x1 + x2) / 2, (y1 + y2) / 2)
        if len(group.numbers) >= 2:
            return (group.numbers[0], group.numbers[1])
    return None


def boxes(text: str, size: int) -> list[tuple[tuple[float, ...], str]]:
    """Every ``size``-number box (4: 2-D corners, 6: 3-D centre + size) with the text before its
    group, where its class is named."""
    return [(box, group.before) for group in number_groups(text) for box in chunks(group, size)]


def normalise_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    """Corners in either order -> ``(x_min, y_min, x_max, y_max)``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def iou2d(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two 2-D boxes (corners in any order). A box with no area (a line
    or a point) has IoU 0 with everything, itself included."""
    ax1, ay1, ax2, ay2 = normalise_box(a)
    bx1, by1, bx2, by2 = normalise_box(b)
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    if area_a <= 0 or area_b <= 0:
        return 0.0
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    return inter / (area_a + area_b - inter)


def iou3d(a: Sequence[float], b: Sequence[float]) -> float:
    """Axis-aligned IoU of two 3-D boxes ``[cx, cy, cz, dx, dy, dz]``. A size that is not positive
    makes the box degenerate: IoU 0."""
    if any(float(d) <= 0 for d in (*a[3:6], *b[3:6])):
        return 0.0
    inter = 1.0
    for axis in range(3):
        lo = max(a[axis] - a[axis + 3] / 2, b[axis] - b[axis + 3] / 2)
        hi = min(a[axis] + a[axis + 3] / 2, b[axis] + b[axis + 3] / 2)
        inter *= max(0.0, hi - lo)
    vol_a = a[3] * a[4] * a[5]
    vol_b = b[3] * b[4] * b[5]
    return inter / (vol_a + vol_b - inter)

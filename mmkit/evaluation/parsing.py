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
#: Words a count may be written as (LAMM's counting parser reads number words too); compounds
#: ("twenty-three", "one hundred and five", "two thousand") are read whole by :func:`first_number`.
NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split())}
NUMBER_WORDS.update({"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
                     "eighty": 80, "ninety": 90, "hundred": 100})
_SCALES = {"thousand": 1_000, "million": 1_000_000}


def words(text: str) -> list[str]:
    """Lower-case alphanumeric words: punctuation and case never decide a match."""
    return _WORD.findall(text.lower())


def _forms(word: str) -> tuple[str, ...]:
    """A label word and its plural/singular (LAMM credits lemmas): cube/cubes, box/boxes, and the
    singular of a plural label: "buildings" is named by "building", "categories" by "category"."""
    forms = [word, word + "s", word + "es"]
    if word.endswith("ies") and len(word) > 4:
        forms.append(word[:-3] + "y")
    elif word.endswith("es") and len(word) > 3:
        forms += [word[:-2], word[:-1]]
    elif word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        forms.append(word[:-1])
    if word.endswith("y") and len(word) > 2:
        forms.append(word[:-1] + "ies")
    return tuple(forms)


def phrase_spans(text_words: Sequence[str], phrase: str) -> list[tuple[int, int]]:
    """Word spans ``[i, j)`` where ``phrase`` occurs as whole words (its last word may be plural,
    or singular for a plural label)."""
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


_COUNT_TOKEN = re.compile(
    # thousands separators ("1,200", "2,345,000") before plain digits; a comma then a space ("12, 13")
    # separates numbers. A minus counts only as a sign ("-2"), not as a range's dash ("3-4").
    r"(?<![\w.,])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d|[.,]\d)|(?<![\w.])-\d+(?:\.\d+)?|\d+(?:\.\d+)?|[a-zA-Z]+")
_JOINER = re.compile(r"\s+|\s*-\s*")


def _number_words(text: str, tokens: list[re.Match[str]], k: int) -> tuple[float, int] | None:
    """The value of the number written in words from ``tokens[k]`` on ("twenty-three", "one hundred
    and five", "two thousand"), and how many tokens it takes; ``None`` if ``tokens[k]`` is not one.
    A word that cannot continue the number ends it: "one two" is 1, then 2."""
    total, current, used, last = 0, None, 0, None  # last: "unit" (0-19), "tens", "hundred", "scale"
    for j in range(k, len(tokens)):
        word = tokens[j].group(0).lower()
        if j > k and not _JOINER.fullmatch(text[tokens[j - 1].end():tokens[j].start()]):
            break
        if word == "and" and last in ("hundred", "scale"):
            continue  # "one hundred and five": counted only if a number word follows
        if word in _SCALES:
            if last in (None, "scale"):
                break
            total, current, last = total + (current or 0) * _SCALES[word], 0, "scale"
        elif word == "hundred":
            if last not in (None, "unit") or (current or 0) >= 100:
                break
            current, last = (current or 1) * 100, "hundred"
        elif word in NUMBER_WORDS:
            value = NUMBER_WORDS[word]
            ok = (last in (None, "hundred", "scale") and not (value == 0 and last is not None)
                  or last == "tens" and 0 < value < 10)
            if not ok:
                break
            current, last = (current or 0) + value, "tens" if value >= 20 else "unit"
        else:
            break
        used = j - k + 1
    if not used:
        return None
    return float(total + (current or 0)), used


def first_number(text: str) -> float | None:
    """The first number written in digits or words ("3", "3.5", "1,200", "three", "twenty-three",
    "one hundred"); ``None`` if none."""
    tokens = list(_COUNT_TOKEN.finditer(text))
    for k, match in enumerate(tokens):
        token = match.group(0)
        if token[0].isdigit() or token[0] == "-":
            return float(token.replace(",", ""))
        found = _number_words(text, tokens, k)
        if found is not None:
            return found[0]
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


def boxes(text: str, size: int, *, join: bool = False) -> list[tuple[tuple[float, ...], str]]:
    """Every ``size``-number box (4: 2-D corners, 6: 3-D centre + size) with the text before its
    group, where its class is named. ``join`` (LAMM's ``parse_bbox_3d``, which chunks the numbers of
    all groups together): when no single group holds a box, consecutive groups' numbers are joined
    before chunking, so "at [1, 2, 0.5] with size [0.5, 0.5, 1]" is one box; each box keeps the text
    before the group its first number is in."""
    groups = number_groups(text)
    if join and groups and all(len(g.numbers) < size for g in groups):
        numbers = [(v, g.before if n == 0 else "") for g in groups for n, v in enumerate(g.numbers)]
        whole = len(numbers) - len(numbers) % size
        return [(tuple(v for v, _ in numbers[i:i + size]), numbers[i][1]) for i in range(0, whole, size)]
    return [(box, group.before) for group in groups for box in chunks(group, size)]


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

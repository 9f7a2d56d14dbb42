"""The built-in metrics, LAMM's definitions made correct (see docs and ``shared/reference/lamm.md``).

Each is a pure function ``(predictions, references) -> dict`` whose first key is the headline.
Predictions are answer texts; a reference is a string, a list or a JSON object, per metric.
Pure Python (plus sacrebleu for BLEU): no torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from mmkit.errors import DataError
from mmkit.evaluation.parsing import (
    boxes,
    chunks,
    first_number,
    first_point,
    iou2d,
    iou3d,
    last_named,
    named,
    normalise_box,
    number_groups,
    points,
    words,
)

Refs = Sequence[Any]


def _pairs(predictions: Sequence[str], references: Refs) -> list[tuple[str, Any]]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    for i, pred in enumerate(predictions):
        if not isinstance(pred, str):
            raise DataError("predictions", i, f"a prediction must be a string, got {type(pred).__name__}",
                            kind="prediction")
    return list(zip(predictions, references, strict=True))


def _bad(i: int, reason: str) -> DataError:
    return DataError("references", i, reason, kind="reference")


def _mean(hits: Iterable[float], n: int) -> float:
    return sum(hits) / n if n else 0.0


def _numbers(value: Any, size: int, i: int, what: str) -> tuple[float, ...]:
    if (not isinstance(value, (list, tuple)) or len(value) != size
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise _bad(i, f"{what} must be a list of {size} finite numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _field(ref: Any, key: str, i: int) -> Any:
    if not isinstance(ref, Mapping) or key not in ref:
        raise _bad(i, f"expected an object with {key!r}, got {ref!r}")
    return ref[key]


# -- classification --------------------------------------------------------------------------------
def _accepted(ref: Any, i: int) -> tuple[str, ...]:
    """A label reference: one string, or a list of accepted synonyms (the first is the label)."""
    names = (ref,) if isinstance(ref, (str, int, float)) and not isinstance(ref, bool) else ref
    if (not isinstance(names, (list, tuple)) or not names
            or not all(isinstance(n, (str, int, float)) and not isinstance(n, bool) for n in names)):
        raise _bad(i, f"a label must be a string or a non-empty list of synonyms, got {ref!r}")
    names = tuple(str(n) for n in names)
    if not all(words(n) for n in names):
        raise _bad(i, f"label {ref!r} has no letters or digits to look for")
    return names


def accuracy(predictions: Sequence[str], references: Refs) -> dict[str, float]:
    """Classification as LAMM scores it: correct when the answer names the label (whole words, case
    and punctuation ignored, a plural accepted) or one of its synonyms. An answer that also names
    another class's label is not credited: "a cube or a sphere" would otherwise game the metric."""
    pairs = _pairs(predictions, references)
    accepted = [_accepted(r, i) for i, (_, r) in enumerate(pairs)]
    vocabulary = {name for names in accepted for name in names}
    hits = 0
    for (pred, _), names in zip(pairs, accepted, strict=True):
        said = named(pred, vocabulary)
        hits += int(bool(said) and said <= set(names))
    return {"accuracy": _mean([hits], len(pairs))}


def exact_match(predictions: Sequence[str], references: Refs) -> dict[str, float]:
    """The answer equals the reference (or one of a list of references), case and surrounding space
    ignored."""
    pairs = _pairs(predictions, references)
    hits = sum(p.strip().lower() in {str(a).strip().lower() for a in _accepted(r, i)}
               for i, (p, r) in enumerate(pairs))
    return {"exact_match": _mean([hits], len(pairs))}


def ocr_word_accuracy(predictions: Sequence[str], references: Refs) -> dict[str, float]:
    """OCR (SVT, LAMM's SVT_OCR): the reference is every word of the input (a list, or one word); a
    sample scores the share of its words the answer contains as whole words, case-insensitive
    ("HOTEL" is read in "The sign says hotel.", not in "hotels"); the mean over samples."""
    pairs = _pairs(predictions, references)
    scores = []
    for i, (pred, ref) in enumerate(pairs):
        text = pred.lower()
        wanted = [w.strip().lower() for w in _accepted(ref, i) if w.strip()]
        found = sum(bool(re.search(rf"(?<![a-z0-9]){re.escape(w)}(?![a-z0-9])", text)) for w in wanted)
        scores.append(found / len(wanted))
    return {"ocr_word_accuracy": _mean(scores, len(scores))}


# -- multiple choice -------------------------------------------------------------------------------
# LAMM's cascade (ChEF's LAMM_VQA): a letter counts only standing alone, so "The answer is blue."
# is not option B and "the answer is a cat" not option A. "(X)" in any case; a bare upper-case
# letter not followed by a letter or digit; a bare lower-case one only as the last word
# ("the answer is c", as LAMM answers are often written). "ANSWER:" and its letter are upper-case.
_MC_PATTERNS = (
    re.compile(r"(?i:the answer is) (?:\(([A-Za-z])\)|([A-Z])(?![A-Za-z0-9])|([a-z])[\s.!]*$)"),
    re.compile(r"ANSWER:\s*(?:\(([A-Z])\)|([A-Z])(?![A-Za-z0-9]))"),
    re.compile(r"\(([A-Za-z])\)"),
)


def _letters(pattern: re.Pattern[str], answer: str) -> list[str]:
    return [next(g for g in match.groups() if g).upper() for match in pattern.finditer(answer)]


def multiple_choice_letter(answer: str, choices: Sequence[str] = ()) -> str | None:
    """LAMM's cascade: "The answer is (X)", then "ANSWER: X", then "(X)"; then, given the choice
    texts, the one choice whose text the answer contains (when it contains exactly one); then an
    answer that is a lone letter. The first pattern found decides: every letter it finds must be
    the same (as LAMM's check_option), so a hedged "(A) or (B)" names no option."""
    for pattern in _MC_PATTERNS:
        found = _letters(pattern, answer)
        if found:
            return found[0] if len(set(found)) == 1 else None
    if choices:
        found = named(answer, [c for c in choices if words(c)])
        hit = [k for k, c in enumerate(choices) if c in found]
        if len(hit) == 1:
            return chr(ord("A") + hit[0])
    stripped = answer.strip().rstrip(".")
    if len(stripped) == 1 and stripped.isalpha():
        return stripped.upper()
    return None


def _mc_reference(ref: Any, i: int) -> tuple[str, tuple[str, ...]]:
    """An option letter ("B"), or LAMM's ``{"gt_choice": 1, "gt_choices": [...]}``, or
    ``{"answer": "B", "choices": [...]}``."""
    if isinstance(ref, str) and len(ref.strip()) == 1 and ref.strip().isalpha():
        return ref.strip().upper(), ()
    if isinstance(ref, Mapping):
        choices = ref.get("gt_choices", ref.get("choices", ()))
        if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
            raise _bad(i, f"choices must be a list of strings, got {choices!r}")
        if "gt_choice" in ref:
            k = ref["gt_choice"]
            if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < (len(choices) or 26):
                raise _bad(i, f"gt_choice must be an index into gt_choices, got {k!r}")
            return chr(ord("A") + k), tuple(choices)
        if "answer" in ref:
            letter, _ = _mc_reference(ref["answer"], i)
            return letter, tuple(choices)
    raise _bad(i, f"expected an option letter or {{'gt_choice': int, 'gt_choices': [...]}}, got {ref!r}")


def multiple_choice_accuracy(predictions: Sequence[str], references: Refs) -> dict[str, float]:
    pairs = _pairs(predictions, references)
    hits = 0
    for i, (pred, ref) in enumerate(pairs):
        letter, choices = _mc_reference(ref, i)
        hits += multiple_choice_letter(pred, choices) == letter
    return {"mc_accuracy": _mean([hits], len(pairs))}


# -- counting --------------------------------------------------------------------------------------
def first_count(answer: str) -> float | None:
    return first_number(answer)


def count(predictions: Sequence[str], references: Refs) -> dict[str, float]:
    """Counting (FSC147): the first number in the answer, in digits or words; an answer with none
    counts as 0 (as LAMM). ``mae``: mean absolute error; ``exact``: share counted exactly."""
    pairs = _pairs(predictions, references)
    errors = []
    for i, (pred, ref) in enumerate(pairs):
        try:
            truth = float(ref)
        except (TypeError, ValueError):
            raise _bad(i, f"a count must be a number, got {ref!r}") from None
        errors.append(abs((first_number(pred) or 0.0) - truth))
    return {"mae": _mean(errors, len(errors)), "exact": _mean([e == 0 for e in errors], len(errors))}


# -- captioning ------------------------------------------------------------------------------------
def bleu(predictions: Sequence[str], references: Refs) -> dict[str, float]:
    """Corpus BLEU-4 on a 0-100 scale (sacrebleu); a reference is a sentence or a list of sentences
    (Flickr30k has five). Predictions and references are lower-cased and their punctuation dropped
    first, as LAMM's scorer does (pycocoevalcap's PTB tokenizer): "A dog runs." matches "a dog runs"."""
    import sacrebleu

    pairs = _pairs(predictions, references)
    refs = []
    for i, (_, ref) in enumerate(pairs):
        sentences = [ref] if isinstance(ref, str) else ref
        if not isinstance(sentences, (list, tuple)) or not sentences or not all(isinstance(s, str) for s in sentences):
            raise _bad(i, f"a caption reference must be a string or a list of strings, got {ref!r}")
        refs.append(list(sentences))
    if not pairs:
        return {"bleu4": 0.0}
    # sacrebleu wants one stream per reference position; a missing one is None.
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(max(map(len, refs)))]
    hyps = [_caption_tokens(p) for p, _ in pairs]
    streams = [[None if r is None else _caption_tokens(r) for r in stream] for stream in streams]
    return {"bleu4": float(sacrebleu.corpus_bleu(hyps, streams, tokenize="none").score)}


_CAPTION_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[^\W_]+")


def _caption_tokens(text: str) -> str:
    """Lower-case words and numbers joined by single spaces; punctuation dropped (PTB-style)."""
    return " ".join(_CAPTION_TOKEN.findall(text.lower()))


# -- localisation ----------------------------------------------------------------------------------
def _inside(point: tuple[float, float], box: Sequence[float]) -> bool:
    x1, y1, x2, y2 = normalise_box(box)
    return x1 < point[0] < x2 and y1 < point[1] < y2


def binary_loc(predictions: Sequence[str], references: Refs) -> dict[str, float]:
    """LAMM's Binary Locating Metric. A reference ``{"bbox": [x1, y1, x2, y2]}``: the first point of
    the answer (a ``(x, y)`` pair, or the centre of the first ``[x1, y1, x2, y2]`` box) lies strictly
    inside the box. A list of objects (LAMM's ``object`` field of its locating files) is scored per
    object, as LAMM: an object counts when any point (or box centre) of the answer lies strictly
    inside it; hits over objects, summed over the set. A ``label`` in an object must also be named."""
    pairs = _pairs(predictions, references)
    hits = total = 0
    for i, (pred, ref) in enumerate(pairs):
        objects = ref if isinstance(ref, (list, tuple)) else [ref]
        if isinstance(ref, (list, tuple)):
            found = [p for group in number_groups(pred) for p in _group_points(group)]
        else:
            point = first_point(pred)
            found = [point] if point is not None else []
        for obj in objects:
            box = _numbers(_field(obj, "bbox", i), 4, i, "bbox")
            label_ok = "label" not in obj or bool(named(pred, _accepted(obj["label"], i)))
            total += 1
            hits += label_ok and any(_inside(p, box) for p in found)
    return {"binary_loc": hits / total if total else 0.0}


def _group_points(group: Any) -> list[tuple[float, float]]:
    """A group's points: its box centre (4 numbers), else its numbers read in pairs."""
    if len(group.numbers) == 4:
        x1, y1, x2, y2 = normalise_box(group.numbers)
        return [((x1 + x2) / 2, (y1 + y2) / 2)]
    return [(p[0], p[1]) for p in chunks(group, 2)]


def _above(value: float, threshold: float, strict: bool) -> bool:
    """IoU over the threshold: ``>`` (LAMM's 3-D scripts) or ``>=`` (ChEF's 2-D detection); never at 0."""
    return value > 0 and (value > threshold if strict else value >= threshold)


def _match(pred_boxes: Sequence[tuple[tuple[float, ...], str | None]],
           ref_boxes: Sequence[tuple[tuple[float, ...], str | None]],
           iou: Callable[[Sequence[float], Sequence[float]], float], threshold: float, *,
           strict: bool = False) -> int:
    """True positives of a one-to-one matching: the largest number of (prediction, reference) pairs
    of the same label with IoU >= threshold (``strict``: IoU > threshold) in which no box is used
    twice (maximum bipartite matching, as ChEF's detection metric; greedy pairing by IoU can miss
    some)."""
    edges = [[r for r, (rbox, rlabel) in enumerate(ref_boxes)
              if plabel is not None and plabel == rlabel and _above(iou(pbox, rbox), threshold, strict)]
             for pbox, plabel in pred_boxes]
    owner: dict[int, int] = {}  # reference -> prediction

    def augment(p: int, seen: set[int]) -> bool:
        for r in edges[p]:
            if r not in seen:
                seen.add(r)
                if r not in owner or augment(owner[r], seen):
                    owner[r] = p
                    return True
        return False

    return sum(augment(p, set()) for p in range(len(pred_boxes)))


def _box_field(obj: Any, key: str, i: int) -> Any:
    # LAMM's 3-D files name a 3-D box "bbox" too; "bbox3d" is accepted first.
    if key == "bbox3d" and isinstance(obj, Mapping) and key not in obj and "bbox" in obj:
        return obj["bbox"]
    return _field(obj, key, i)


def _objects(ref: Any, key: str, size: int, i: int) -> list[tuple[tuple[float, ...], tuple[str, ...]]]:
    if isinstance(ref, Mapping):
        ref = [ref]  # one object given bare
    if not isinstance(ref, (list, tuple)):
        raise _bad(i, f"expected a list of {{'label': ..., {key!r}: [...]}} objects, got {ref!r}")
    return [(_numbers(_box_field(obj, key, i), size, i, key), _accepted(_field(obj, "label", i), i)) for obj in ref]


def _detection(predictions: Sequence[str], references: Refs, *, key: str, size: int,
               iou: Callable[[Sequence[float], Sequence[float]], float],
               thresholds: Sequence[float], strict: bool = False) -> dict[str, dict[str, int]]:
    """Micro-averaged counts per threshold: true positives, predicted boxes, reference objects."""
    pairs = _pairs(predictions, references)
    objects = [_objects(r, key, size, i) for i, (_, r) in enumerate(pairs)]
    # Every label (and synonym) of the set is the vocabulary a predicted box's class is read from.
    vocabulary = {n for objs in objects for _, names in objs for n in names}
    counts = {t: {"tp": 0, "pred": 0, "ref": 0} for t in thresholds}
    for (pred, _), objs in zip(pairs, objects, strict=True):
        canon = {n: names[0] for _, names in objs for n in names}
        found = [(box, canon.get(last_named(before, vocabulary) or "", None))
                 for box, before in boxes(pred, size, join=size == 6)]
        refs = [(box, names[0]) for box, names in objs]
        for t in thresholds:
            counts[t]["tp"] += _match(found, refs, iou, t, strict=strict)
            counts[t]["pred"] += len(found)
            counts[t]["ref"] += len(refs)
    return {f"{t:g}": c for t, c in counts.items()}


def det2d(predictions: Sequence[str], references: Refs) -> dict[str, float]:
    """2-D detection (VOC): each ``[x1, y1, x2, y2]`` box in the answer (normalised 0-1, corners in
    any order) takes the class named last before it; one-to-one matching to reference objects of
    the same class at IoU >= t (ChEF's 2-D rule; the 3-D metrics need IoU > t, as LAMM's 3-D
    scripts), the most pairs possible, each box used once. True positives, predicted boxes and
    reference objects are summed over the whole set before dividing (micro-average). A box with no
    area never matches."""
    counts = _detection(predictions, references, key="bbox", size=4, iou=iou2d, thresholds=(0.5, 0.25))
    out = {}
    for t in ("0.5", "0.25"):
        c = counts[t]
        out[f"recall@{t}"] = c["tp"] / c["ref"] if c["ref"] else 0.0
        out[f"precision@{t}"] = c["tp"] / c["pred"] if c["pred"] else 0.0
    return {k: out[k] for k in ("recall@0.5", "precision@0.5", "recall@0.25", "precision@0.25")}


def det3d(predictions: Sequence[str], references: Refs) -> dict[str, float]:
    """3-D detection (ScanNet): ``[cx, cy, cz, dx, dy, dz]`` boxes (a centre group then a size group
    are joined, as LAMM's parse_bbox_3d), classes as for ``det2d``, axis-aligned 3-D IoU, one-to-one;
    micro-averaged recall at IoU > 0.25 and > 0.5 (strictly above, as LAMM's 3-D scripts)."""
    counts = _detection(predictions, references, key="bbox3d", size=6, iou=iou3d, thresholds=(0.25, 0.5),
                        strict=True)
    return {f"recall@{t}": c["tp"] / c["ref"] if c["ref"] else 0.0 for t, c in counts.items()}


def grounding3d(predictions: Sequence[str], references: Refs) -> dict[str, float]:
    """3-D visual grounding (ScanRefer): the answer's first ``[cx, cy, cz, dx, dy, dz]`` box (a centre
    group then a size group are joined, as LAMM's parse_bbox_3d) against the referred object's
    (``bbox3d``, or ``bbox`` as LAMM's files name it); accuracy at IoU > 0.25 and > 0.5 (strictly
    above, as LAMM's 3-D scripts)."""
    pairs = _pairs(predictions, references)
    ious = []
    for i, (pred, ref) in enumerate(pairs):
        truth = _numbers(_box_field(ref, "bbox3d", i), 6, i, "bbox3d")
        found = boxes(pred, 6, join=True)
        ious.append(iou3d(found[0][0], truth) if found else 0.0)
    return {"acc@0.25": _mean([v > 0.25 for v in ious], len(ious)),
            "acc@0.5": _mean([v > 0.5 for v in ious], len(ious))}


def pck(predictions: Sequence[str], references: Refs) -> dict[str, float]:
    """Keypoints (LSP): the answer's points, read in order as ``(x, y)`` / ``[x, y]`` pairs, are the
    joints in the reference's order. Joint k is correct when predicted point k lies within
    0.1 x the larger side of the reference ``bbox`` of reference joint k (Euclidean distance, same
    units as the references). Score: correct joints / reference joints over the whole set; a
    missing point is wrong; a ``null`` reference joint (not visible) is not counted."""
    pairs = _pairs(predictions, references)
    correct = total = 0
    for i, (pred, ref) in enumerate(pairs):
        box = normalise_box(_numbers(_field(ref, "bbox", i), 4, i, "bbox"))
        joints = _field(ref, "keypoints", i)
        if not isinstance(joints, (list, tuple)):
            raise _bad(i, f"keypoints must be a list of [x, y] pairs, got {joints!r}")
        radius = 0.1 * max(box[2] - box[0], box[3] - box[1])
        found = points(pred)
        for k, joint in enumerate(joints):
            if joint is None:
                continue
            jx, jy = _numbers(joint, 2, i, f"keypoint {k}")
            total += 1
            if k < len(found):
                correct += math.hypot(found[k][0] - jx, found[k][1] - jy) <= radius
    return {"pck@0.1": correct / total if total else 0.0}


count_mae = count  # the name mmkit used before `count` (kept for existing callers)

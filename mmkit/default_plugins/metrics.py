"""The built-in metrics (LAMM's benchmark metrics; definitions in mmkit.evaluation.metrics)."""

from mmkit import hookimpl
from mmkit.specs import MetricSpec

_M = "mmkit.evaluation.metrics"

_BUILTIN = (
    ("accuracy", "accuracy", "label (or a synonym) named in the answer, no other label named (LAMM classification)"),
    ("mc_accuracy", "multiple_choice_accuracy", "LAMM's multiple-choice cascade; reference: option letter or "
                                                "{gt_choice, gt_choices}"),
    ("count", "count", "first number or number word in the answer (none = 0): mae, exact (FSC147)"),
    ("bleu", "bleu", "corpus BLEU-4, 0-100, sacrebleu on lower-cased text without punctuation (as LAMM's PTB "
                     "tokenizer); reference: sentence or list of sentences (Flickr30k)"),
    ("binary_loc", "binary_loc", "first point (or box centre) strictly inside the reference bbox; per object for a "
                                 "list of objects (LAMM Binary-Loc)"),
    ("det2d", "det2d", "class + [x1, y1, x2, y2] boxes, one-to-one, micro recall/precision @0.5, @0.25 (VOC)"),
    ("det3d", "det3d", "class + [cx, cy, cz, dx, dy, dz] boxes, axis-aligned 3D IoU, micro recall @IoU>0.25, >0.5"),
    ("grounding3d", "grounding3d", "first 3D box vs the referred object's: acc@IoU>0.25, >0.5 (ScanRefer)"),
    ("pck", "pck", "k-th (x, y) point within 0.1 x the bbox's larger side of joint k (LSP)"),
    ("ocr_word_accuracy", "ocr_word_accuracy", "share of the reference words (every word of the input) in the answer "
                                               "as whole words, any case, mean over samples (SVT)"),
    ("exact_match", "exact_match", "answer equals the reference, case-insensitive"),
    ("count_mae", "count", "same as count (its former name)"),
)


@hookimpl
def mmkit_metrics():
    return [MetricSpec(name=name, compute=f"{_M}:{attr}", description=text) for name, attr, text in _BUILTIN]

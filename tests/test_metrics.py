"""The built-in metrics (LAMM's definitions)."""

from __future__ import annotations

import pytest

from mmkit.evaluation.metrics import (
    accuracy,
    count_mae,
    exact_match,
    first_count,
    multiple_choice_accuracy,
    multiple_choice_letter,
)
from mmkit.specs import resolve


def test_accuracy_credits_the_label_named_in_the_answer():
    refs = ["cube", "sphere", "cone", "torus"]
    preds = ["It is a cube.", "A SPHERE", "cone", "a donut"]
    assert accuracy(preds, refs) == {"accuracy": 0.75}


def test_accuracy_needs_whole_words():
    refs = ["cat", "dog"]
    # "category" contains "cat" but is not the word; "hotdog" is not "dog"
    assert accuracy(["a category", "hotdog"], refs)["accuracy"] == 0.0
    assert accuracy(["cat", "the dog!"], refs)["accuracy"] == 1.0


def test_accuracy_accepts_a_plural():
    assert accuracy(["three cubes", "spheres"], ["cube", "sphere"])["accuracy"] == 1.0
    assert accuracy(["cubed"], ["cube"])["accuracy"] == 0.0


def test_answers_naming_several_labels_are_not_credited():
    refs = ["cube", "sphere"]
    assert accuracy(["a cube or a sphere", "sphere"], refs)["accuracy"] == 0.5
    # a label only counts as "named" if it is one of the references' labels
    assert accuracy(["a red cube"], ["cube"])["accuracy"] == 1.0


def test_accuracy_with_multi_word_and_digit_labels():
    refs = ["traffic light", "7", "1"]
    assert accuracy(["a traffic light", "It shows 7", "17"], refs)["accuracy"] == pytest.approx(2 / 3)
    assert accuracy(["traffic lights"], ["traffic light"])["accuracy"] == 1.0


def test_accuracy_of_nothing():
    assert accuracy([], []) == {"accuracy": 0.0}
    with pytest.raises(ValueError):
        accuracy(["a"], ["a", "b"])  # predictions and references must pair up


def test_exact_match():
    assert exact_match([" Yes", "no", "maybe so"], ["yes", "No", "maybe"]) == {"exact_match": pytest.approx(2 / 3)}
    assert exact_match([], []) == {"exact_match": 0.0}


@pytest.mark.parametrize(("answer", "letter"), [
    ("The answer is (B).", "B"),
    ("the answer is c", "C"),
    ("ANSWER: D", "D"),
    ("I think (A) fits best", "A"),
    ("b", "B"),
    ("  E ", "E"),
    ("I am not sure", None),
    ("", None),
])
def test_multiple_choice_letter(answer, letter):
    assert multiple_choice_letter(answer) == letter


def test_multiple_choice_cascade_order():
    # "The answer is (X)" beats a parenthesised option mentioned earlier
    assert multiple_choice_letter("Between (A) and (C), the answer is (C)") == "C"
    # "ANSWER:" is case-sensitive in LAMM's cascade; (X) is the last resort
    assert multiple_choice_letter("answer: b but maybe (D)") == "D"


def test_multiple_choice_accuracy():
    preds = ["The answer is (A)", "(C)", "B", "no idea"]
    refs = ["A", "B", "b", "D"]
    assert multiple_choice_accuracy(preds, refs) == {"mc_accuracy": 0.5}


@pytest.mark.parametrize(("answer", "count"), [
    ("There are 3 chairs", 3.0),
    ("three chairs and 5 tables", 3.0),  # the first number, word or digits
    ("I count twelve.", 12.0),
    ("-2", -2.0),
    ("2.5 apples", 2.5),
    ("none that I can see", None),
])
def test_first_count(answer, count):
    assert first_count(answer) == count


def test_count_mae():
    assert count_mae(["3", "five", "no idea"], ["3", "7", "2"]) == {"mae": pytest.approx((0 + 2 + 2) / 3),
                                                                  "exact": pytest.approx(1 / 3)}
    assert count_mae([], []) == {"mae": 0.0, "exact": 0.0}


def test_metrics_are_registered(host):
    metrics = host.metrics()
    assert set(metrics) >= {"accuracy", "exact_match", "mc_accuracy", "count_mae"}
    assert resolve(metrics["mc_accuracy"].compute)(["The answer is (A)"], ["A"]) == {"mc_accuracy": 1.0}
    assert resolve(metrics["accuracy"].compute)(["a cube"], ["cube"]) == {"accuracy": 1.0}
    assert resolve(metrics["exact_match"].compute)(["Cube"], ["cube"]) == {"exact_match": 1.0}
    # the first key is the headline figure the evaluation reports
    assert next(iter(resolve(metrics["count_mae"].compute)(["4 of them"], ["2"]).items())) == ("mae", 2.0)


# -- the LAMM benchmark metrics: every value below is worked out by hand in the comments -----------
from mmkit.errors import DataError  # noqa: E402
from mmkit.evaluation import metrics as M  # noqa: E402
from mmkit.evaluation.parsing import boxes, first_point, iou2d, iou3d, points  # noqa: E402

ALL_METRICS = ("accuracy", "mc_accuracy", "count", "bleu", "binary_loc", "det2d", "det3d", "grounding3d",
               "pck", "ocr_word_accuracy")


def test_every_issue_metric_is_registered_with_its_headline_first(host):
    metrics = host.metrics()
    headlines = {"accuracy": "accuracy", "mc_accuracy": "mc_accuracy", "count": "mae", "bleu": "bleu4",
                 "binary_loc": "binary_loc", "det2d": "recall@0.5", "det3d": "recall@0.25",
                 "grounding3d": "acc@0.25", "pck": "pck@0.1", "ocr_word_accuracy": "ocr_word_accuracy"}
    refs = {"accuracy": "cat", "mc_accuracy": "A", "count": 3, "bleu": "a cat", "binary_loc": {"bbox": [0, 0, 1, 1]},
            "det2d": [{"label": "cat", "bbox": [0, 0, 1, 1]}],
            "det3d": [{"label": "chair", "bbox3d": [0, 0, 0, 1, 1, 1]}],
            "grounding3d": {"bbox3d": [0, 0, 0, 1, 1, 1]},
            "pck": {"keypoints": [[0.5, 0.5]], "bbox": [0, 0, 1, 1]}, "ocr_word_accuracy": "cat"}
    for name in ALL_METRICS:
        result = resolve(metrics[name].compute)(["nothing useful"], [refs[name]])
        assert next(iter(result)) == headlines[name], name
        assert all(isinstance(v, float) for v in result.values()), name


def test_accuracy_synonyms_and_other_classes():
    refs = [["cat", "kitty"], "dog", ["cat", "kitty"]]
    # 1: synonym -> right; 2: names dog and the other class's synonym -> wrong; 3: empty answer -> wrong
    assert M.accuracy(["a kitty", "a dog or a kitty", ""], refs)["accuracy"] == pytest.approx(1 / 3)
    # a label inside a longer named label is not a second answer: "traffic light" is not also "light"
    assert M.accuracy(["a traffic light", "a light"], ["traffic light", "light"])["accuracy"] == 1.0
    assert M.accuracy(["two boxes"], ["box"])["accuracy"] == 1.0  # plural in -es
    with pytest.raises(DataError, match="record 0"):
        M.accuracy(["x"], [{"label": "cat"}])


def test_mc_accuracy_lamm_references_and_choice_text():
    ref = {"gt_choice": 1, "gt_choices": ["red", "blue", "green"]}
    preds = ["The answer is (B).", "It is blue.", "blue or green", "(A) red", "", "B"]
    # hits: cascade (B); text "blue" only; two texts -> none; (A) wrong; empty; lone letter B
    assert M.multiple_choice_accuracy(preds, [ref] * 6) == {"mc_accuracy": pytest.approx(3 / 6)}
    # "The answer is" wins over the choice text
    assert M.multiple_choice_letter("blue, so the answer is (C)", ["red", "blue", "green"]) == "C"
    assert M.multiple_choice_accuracy(["ANSWER: b"], [{"answer": "B", "choices": []}]) == {"mc_accuracy": 0.0}
    with pytest.raises(DataError):
        M.multiple_choice_accuracy(["A"], [{"gt_choice": 7, "gt_choices": ["x", "y"]}])


def test_count_mae_and_exact():
    preds = ["There are 4 apples.", "three", "I count 2, maybe 3", "", "12 birds"]
    refs = [4, "5", 2, 1, 10.0]
    # errors: 0, 2, 0, 1 (nothing parsed = 0), 2 -> mae 5/5 = 1.0; exact 2/5
    assert M.count(preds, refs) == {"mae": pytest.approx(1.0), "exact": pytest.approx(0.4)}
    assert M.first_count("3-4 birds") == 3.0
    with pytest.raises(DataError, match="a count must be a number"):
        M.count(["1"], ["many"])


def test_bleu_is_sacrebleus_corpus_bleu():
    import sacrebleu

    preds = ["a dog runs on the grass", "two men are talking"]
    refs = [["a dog is running on the grass", "the dog runs on grass"], "two men talk"]
    expected = sacrebleu.corpus_bleu(preds, [["a dog is running on the grass", "two men talk"],
                                             ["the dog runs on grass", None]]).score
    assert M.bleu(preds, refs) == {"bleu4": pytest.approx(expected)}
    assert 0 < expected < 100
    assert M.bleu(["a cat sat on the mat ."], ["a cat sat on the mat ."]) == {"bleu4": pytest.approx(100.0)}
    assert M.bleu([""], ["a cat sat on the mat"]) == {"bleu4": 0.0}


def test_binary_loc():
    ref = {"bbox": [0.2, 0.2, 0.6, 0.6]}
    preds = [
        "The cat is at (0.4, 0.5).",            # inside
        "It is at [0.5, 0.5, 0.3, 0.3].",       # swapped corners: centre (0.4, 0.4) inside
        "(0.7, 0.5) or (0.4, 0.4)",             # only the first point counts: outside
        "at (0.2, 0.4)",                        # on the edge: not strictly inside
        "no idea",                              # nothing parsed
        "",                                     # empty
    ]
    assert M.binary_loc(preds, [ref] * 6) == {"binary_loc": pytest.approx(2 / 6)}
    # a labelled reference also needs its class named
    labelled = {"bbox": [0, 0, 1, 1], "label": "dog"}
    assert M.binary_loc(["the dog (0.5, 0.5)", "the cat (0.5, 0.5)"], [labelled] * 2)["binary_loc"] == 0.5
    with pytest.raises(DataError, match="bbox must be a list of 4"):
        M.binary_loc(["(0.5, 0.5)"], [{"bbox": [0, 0, 1]}])


def test_binary_loc_over_objects_as_lamm():
    objects = [{"label": "dog", "bbox": [0.0, 0.0, 0.5, 0.5]}, {"label": "cat", "bbox": [0.5, 0.5, 1.0, 1.0]},
               {"label": "dog", "bbox": [0.6, 0.0, 1.0, 0.4]}]
    # any point or box centre counts for each object: the dog at (0.2, 0.2) and the cat box centred at
    # (0.75, 0.75) hit; the second dog (0.6-1.0 x 0-0.4) has no point in it -> 2 of 3 objects
    pred = "a dog (0.2, 0.2) and a cat [0.6, 0.6, 0.9, 0.9]"
    assert M.binary_loc([pred, ""], [objects, objects[:1]]) == {"binary_loc": pytest.approx(2 / 4)}
    # the class must be named: the same points without "cat" miss the cat
    assert M.binary_loc(["a dog (0.2, 0.2) [0.6, 0.6, 0.9, 0.9]"], [objects[:2]]) == {"binary_loc": 0.5}


def test_iou2d_by_hand():
    assert iou2d([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)  # 1 / (4 + 4 - 1)
    assert iou2d([2, 2, 0, 0], [0, 0, 2, 2]) == 1.0  # swapped corners
    assert iou2d([0, 0, 0, 2], [0, 0, 0, 2]) == 0.0  # degenerate: never matches, even itself


def test_det2d_one_to_one_same_label_micro_averaged():
    refs = [
        [{"label": "dog", "bbox": [0.0, 0.0, 0.4, 0.4]}, {"label": "cat", "bbox": [0.5, 0.5, 1.0, 1.0]}],
        [{"label": "person", "bbox": [0.1, 0.1, 0.5, 0.5]}],
    ]
    preds = [
        # dog exact; cat box shifted: IoU = 0.3x0.5 / (0.25+0.25-0.15) = 0.15/0.35 = 0.4286 (>=0.25, <0.5);
        # a duplicate dog box cannot match the same dog twice
        "a dog [0.0, 0.0, 0.4, 0.4], a cat [0.7, 0.5, 1.2, 1.0] and a dog [0.0, 0.0, 0.4, 0.4]",
        # right box, wrong class; then a degenerate person box
        "a cat [0.1, 0.1, 0.5, 0.5] and a person [0.1, 0.1, 0.1, 0.5]",
    ]
    # @0.5: tp 1 (dog) of 3 refs, 5 predicted boxes; @0.25: tp 2 (dog, cat)
    assert M.det2d(preds, refs) == {"recall@0.5": pytest.approx(1 / 3), "precision@0.5": pytest.approx(1 / 5),
                                    "recall@0.25": pytest.approx(2 / 3), "precision@0.25": pytest.approx(2 / 5)}


def test_det2d_matching_is_maximal_not_greedy():
    # (x ranges; every box spans y 0-1) A = 0-0.5, B = 0.3-0.8 (both dogs); p1 = 0.1-0.6, p2 = 0-0.3.
    # IoU(p1, A) = 0.4/0.6 = 0.667, IoU(p1, B) = 0.3/0.7 = 0.43, IoU(p2, A) = 0.3/0.5 = 0.6, IoU(p2, B) = 0.
    # Greedy by IoU pairs p1-A first and leaves p2 and B unmatched; the best one-to-one pairing at
    # 0.25 is p1-B and p2-A: 2 hits. At 0.5 only A can be matched: 1 hit.
    refs = [[{"label": "dog", "bbox": [0.0, 0.0, 0.5, 1.0]}, {"label": "dog", "bbox": [0.3, 0.0, 0.8, 1.0]}]]
    preds = ["dog [0.1, 0.0, 0.6, 1.0] dog [0.0, 0.0, 0.3, 1.0]"]
    assert M.det2d(preds, refs) == {"recall@0.5": 0.5, "precision@0.5": 0.5, "recall@0.25": 1.0,
                                    "precision@0.25": 1.0}


def test_det2d_edge_cases():
    ref = [{"label": ["person", "man"], "bbox": [0.1, 0.1, 0.5, 0.5]}]
    # synonym, swapped corners
    assert M.det2d(["a man [0.5, 0.5, 0.1, 0.1]"], [ref])["recall@0.5"] == 1.0
    # nothing parsed / empty: no predictions, precision 0 rather than a division by zero
    assert M.det2d(["I see a person", ""], [ref, ref]) == {
        "recall@0.5": 0.0, "precision@0.5": 0.0, "recall@0.25": 0.0, "precision@0.25": 0.0}
    # no class named before the box: it matches nothing
    assert M.det2d(["[0.1, 0.1, 0.5, 0.5]"], [ref])["recall@0.25"] == 0.0
    assert M.det2d([], []) == {"recall@0.5": 0.0, "precision@0.5": 0.0, "recall@0.25": 0.0, "precision@0.25": 0.0}
    with pytest.raises(DataError, match="'label'"):
        M.det2d(["x"], [[{"bbox": [0, 0, 1, 1]}]])


def test_iou3d_by_hand():
    # unit cubes offset by 0.5 on x: overlap 0.5 -> 0.5 / (1 + 1 - 0.5) = 1/3
    assert iou3d([0, 0, 0, 1, 1, 1], [0.5, 0, 0, 1, 1, 1]) == pytest.approx(1 / 3)
    # a 2x2x2 box holding a unit cube: 1 / 8
    assert iou3d([0, 0, 0, 2, 2, 2], [0, 0, 0, 1, 1, 1]) == pytest.approx(1 / 8)
    assert iou3d([0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1]) == 0.0  # flat: degenerate


def test_det3d():
    refs = [[{"label": "chair", "bbox3d": [0, 0, 0, 1, 1, 1]}, {"label": "table", "bbox3d": [3, 3, 0, 2, 2, 1]}]]
    # chair offset 0.5 on x: IoU 1/3 (>=0.25, <0.5); table exact; duplicate table box unmatched
    preds = ["chair [0.5, 0, 0, 1, 1, 1]; table [3, 3, 0, 2, 2, 1], table [3, 3, 0, 2, 2, 1]"]
    assert M.det3d(preds, refs) == {"recall@0.25": 1.0, "recall@0.5": 0.5}
    assert M.det3d(["a chair somewhere"], refs[:1]) == {"recall@0.25": 0.0, "recall@0.5": 0.0}
    # LAMM's 3-D files call the box "bbox"
    lamm = [[{"label": "chair", "bbox": [0, 0, 0, 1, 1, 1]}]]
    assert M.det3d(["chair [0, 0, 0, 1, 1, 1]"], lamm) == {"recall@0.25": 1.0, "recall@0.5": 1.0}
    assert M.grounding3d(["[0, 0, 0, 1, 1, 1]"], [{"bbox": [0, 0, 0, 1, 1, 1]}]) == {"acc@0.25": 1.0, "acc@0.5": 1.0}


def test_grounding3d_uses_the_first_box():
    ref = {"bbox3d": [0, 0, 0, 1, 1, 1]}
    preds = ["[0, 0, 0, 1, 1, 1]", "it is at [0.5, 0, 0, 1, 1, 1]", "[9, 9, 9, 1, 1, 1] [0, 0, 0, 1, 1, 1]",
             "", "[-0.1, 0, 0, 1, 1, 1]"]
    # IoUs: 1, 1/3, 0 (first box only), 0 (empty), 0.9/1.1 = 0.818 (negative coordinates parse)
    assert M.grounding3d(preds, [ref] * 5) == {"acc@0.25": pytest.approx(3 / 5), "acc@0.5": pytest.approx(2 / 5)}


def test_pck_is_within_a_tenth_of_the_larger_box_side():
    # box 0.5 wide, 1.0 tall -> radius 0.1
    ref = {"keypoints": [[0.2, 0.2], [0.4, 0.4], [0.3, 0.9], None], "bbox": [0.5, 1.0, 0.0, 0.0]}
    # joint 0: distance 0.06 -> right; joint 1: 0.1 exactly -> right; joint 2: missing; joint 3: not counted
    pred = "head (0.26, 0.2), neck [0.4, 0.5]"
    assert M.pck([pred], [ref]) == {"pck@0.1": pytest.approx(2 / 3)}
    # not always 0 (LAMM's bug): perfect answers score 1
    assert M.pck(["(0.2, 0.2) (0.4, 0.4) (0.3, 0.9) (0, 0)"], [ref]) == {"pck@0.1": 1.0}
    assert M.pck(["", "no joints"], [ref, ref]) == {"pck@0.1": 0.0}
    # 4-number groups are boxes, not two points
    assert points("box [0.1, 0.1, 0.2, 0.2] then (0.3, 0.4)") == [(0.3, 0.4)]
    assert points("0.1 0.2 0.3 0.4") == [(0.1, 0.2), (0.3, 0.4)]


def test_ocr_word_accuracy():
    preds = ["The sign says HOTEL.", "hotels nearby", "", "motel"]
    assert M.ocr_word_accuracy(preds, ["hotel"] * 4) == {"ocr_word_accuracy": 0.25}
    assert M.ocr_word_accuracy(["it reads 24/7"], ["24/7"]) == {"ocr_word_accuracy": 1.0}


def test_parsing_helpers():
    assert first_point("[0.1, 0.2, 0.3, 0.4] and (0.9, 0.9)") == pytest.approx((0.2, 0.3))
    assert first_point("nothing") is None
    found = boxes("dog [1, 2, 3, 4, 5, 6, 7, 8] cat [9, 9, 9]", 4)
    assert [b for b, _ in found] == [(1, 2, 3, 4), (5, 6, 7, 8)]  # an 8-number group is two boxes
    assert found[0][1] == "dog "


def test_metrics_reject_unpaired_inputs():
    for name in ALL_METRICS:
        with pytest.raises(ValueError):
            getattr(M, {"mc_accuracy": "multiple_choice_accuracy"}.get(name, name))(["a"], [])


# -- review fixes (LAMM's definitions, shared/reference/lamm.md and LAMM's scoring code) ------------
def _mc(answer: str, gt_choice: int, choices: list[str]) -> float:
    return multiple_choice_accuracy([answer], [{"gt_choice": gt_choice, "gt_choices": choices}])["mc_accuracy"]


def test_the_answer_is_reads_a_letter_only_when_it_stands_alone():
    """LAMM's pattern is ``The answer is \\(?[A-E]\\)?\\W``: an upper-case letter on its own. "The
    answer is blue." names option A's text; reading the "b" of "blue" as option B scores a right
    answer wrong (and "a cat" is the article, not option A)."""
    assert multiple_choice_letter("The answer is blue.", ["blue", "red"]) == "A"
    assert _mc("The answer is blue.", 0, ["blue", "red"]) == 1.0
    assert multiple_choice_letter("I think the answer is a cat.", ["dog", "cat"]) == "B"
    assert _mc("I think the answer is a cat.", 1, ["dog", "cat"]) == 1.0
    # the letter forms still read; a lower-case letter only as the last word
    assert multiple_choice_letter("The answer is (B).", ["blue", "red"]) == "B"
    assert multiple_choice_letter("The answer is B", ["blue", "red"]) == "B"
    assert multiple_choice_letter("The answer is A because it is red", ["red", "blue"]) == "A"
    assert multiple_choice_letter("the answer is b.") == "B"


def test_answer_colon_reads_a_letter_only_when_it_stands_alone():
    assert multiple_choice_letter("ANSWER: Blue", ["blue", "red"]) == "A"
    assert multiple_choice_letter("ANSWER: B", ["blue", "red"]) == "B"


def test_an_answer_giving_several_letters_is_not_credited():
    """LAMM's check_option: every "(X)" (or "The answer is X") found must be the right letter; a
    hedged "(A) or (B)" is not credited for A (as naming every class is not, for accuracy)."""
    assert _mc("(A) or (B)", 0, ["red", "blue"]) == 0.0
    assert multiple_choice_letter("(A) or (B)", ["red", "blue"]) is None
    assert _mc("The answer is (A). No, the answer is (B).", 0, ["red", "blue"]) == 0.0
    assert _mc("(A) red, so (A).", 0, ["red", "blue"]) == 1.0


def test_3d_grounding_and_detection_need_iou_above_the_threshold():
    """LAMM's 3-D scripts count IoU > t (lamm.md: "IoU > 0.5", "> 0.25 and > 0.5"); det2d keeps >=."""
    from mmkit.evaluation.metrics import det2d, det3d, grounding3d

    truth = [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    half, quarter = [0.0, 0.0, 0.0, 1.0, 1.0, 2.0], [0.0, 0.0, 0.0, 1.0, 1.0, 4.0]
    assert iou3d(half, truth) == 0.5 and iou3d(quarter, truth) == 0.25  # exactly, in floats
    box = lambda b: "[" + ", ".join(str(v) for v in b) + "]"  # noqa: E731
    got = grounding3d([box(half), box(quarter)], [{"bbox3d": truth}, {"bbox3d": truth}])
    # IoU 0.5: > 0.25 but not > 0.5; IoU 0.25: neither
    assert got == {"acc@0.25": 0.5, "acc@0.5": 0.0}
    got = det3d([f"a chair {box(half)}"], [[{"label": "chair", "bbox3d": truth}]])
    assert got == {"recall@0.25": 1.0, "recall@0.5": 0.0}
    # 2-D: IoU exactly 0.5 still counts at 0.5 (ChEF's >=)
    assert iou2d([0, 0, 1, 0.5], [0, 0, 1, 1]) == 0.5
    assert det2d(["a dog [0, 0, 1, 0.5]"], [[{"label": "dog", "bbox": [0, 0, 1, 1]}]])["recall@0.5"] == 1.0


def test_3d_boxes_read_from_centre_and_size_groups():
    """LAMM's parse_bbox_3d takes the numbers of all groups and chunks them by 6: "at [1, 2, 0.5]
    with size [0.5, 0.5, 1]" is the box [1, 2, 0.5, 0.5, 0.5, 1]. Chunking each group alone finds
    no box: a right answer scored 0."""
    truth = {"bbox3d": [1.0, 2.0, 0.5, 0.5, 0.5, 1.0]}
    got = M.grounding3d(["The chair is at [1.0, 2.0, 0.5] with size [0.5, 0.5, 1.0]."], [truth])
    assert got == {"acc@0.25": 1.0, "acc@0.5": 1.0}
    # detection: each joined box takes the class named before its centre group
    answer = "a chair at [0, 0, 0] size [1, 1, 1] and a table at (5, 5, 0) size (2, 2, 1)"
    refs = [[{"label": "chair", "bbox3d": [0, 0, 0, 1, 1, 1]}, {"label": "table", "bbox3d": [5, 5, 0, 2, 2, 1]}]]
    assert M.det3d([answer], refs) == {"recall@0.25": 1.0, "recall@0.5": 1.0}
    # a group that is a box on its own is not joined with its neighbours; 2-D boxes are never joined
    assert [b for b, _ in boxes("[1, 2, 3, 4, 5, 6] [7, 8, 9]", 6, join=True)] == [(1, 2, 3, 4, 5, 6)]
    assert boxes("[0.1, 0.2] to [0.5, 0.6]", 4) == []


def test_count_reads_thousands_separators():
    """FSC147 counts run into the thousands; "1,200" is one number, not 1."""
    assert M.count(["There are 1,200 people.", "I count 2,345 beans", "12, 13 or 14"], [1200, 2345, 12]) == \
        {"mae": 0.0, "exact": 1.0}
    # only groups of three digits after a comma: "1,2000" is not a thousands-separated number
    assert [first_count(a) for a in ("1,2000", "12,345.5 g", "1,200,000 grains")] == [1, 12345.5, 1200000]


@pytest.mark.parametrize(("answer", "value"), [
    ("twenty-three birds", 23), ("one hundred apples", 100), ("twenty five", 25), ("ninety-nine", 99),
    ("two hundred and five cars", 205), ("three thousand four hundred", 3400), ("one, two, three", 1),
    ("one two three", 1), ("one hundred and then some", 100), ("seven", 7),
])
def test_count_reads_compound_number_words(answer, value):
    assert first_count(answer) == value


def test_a_plural_label_accepts_its_singular():
    """LAMM lemmatises the answer's words (WordNet, nouns) and accepts the label's lemmas: the
    UCMerced class "buildings" is named by "a building", "storage tanks" by "a storage tank"."""
    preds = ["This is a building.", "It shows a storage tank.", "a forest"]
    assert accuracy(preds, ["buildings", "storage tanks", "forest"]) == {"accuracy": 1.0}
    # still: naming another class of the set is not credited
    assert accuracy(["a building next to a forest", "a forest"], ["buildings", "forest"]) == {"accuracy": 0.5}


def test_svt_scores_the_share_of_the_images_words_read():
    """An SVT record's ``word_list`` holds every word of the image; LAMM scores a sample by the
    share of them found among the answer's words (then the mean over samples). Reading one word of
    three is 1/3, not full marks."""
    got = M.ocr_word_accuracy(["The sign says HOTEL", "grand central hotel"],
                              [["hotel", "grand", "central"], ["hotel", "grand", "central"]])
    assert got["ocr_word_accuracy"] == pytest.approx((1 / 3 + 1) / 2)


def test_bleu_ignores_case_and_punctuation_as_lamms_scorer():
    """LAMM_Caption tokenises predictions and references with the COCO PTB tokenizer (lower case,
    punctuation dropped) before BLEU. A caption differing from its reference only by a capital and
    a full stop is a perfect match there; case-sensitive 13a scoring gives it about 68."""
    got = M.bleu(["A brown dog runs on the grass."], [["a brown dog runs on the grass"]])["bleu4"]
    assert got == pytest.approx(100.0)

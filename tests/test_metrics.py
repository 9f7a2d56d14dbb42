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
    assert count_mae(["3", "five", "no idea"], ["3", "7", "2"]) == {"mae": pytest.approx((0 + 2 + 2) / 3)}
    assert count_mae([], []) == {"mae": 0.0}


def test_metrics_are_registered(host):
    metrics = host.metrics()
    assert set(metrics) >= {"accuracy", "exact_match", "mc_accuracy", "count_mae"}
    assert resolve(metrics["mc_accuracy"].compute)(["The answer is (A)"], ["A"]) == {"mc_accuracy": 1.0}
    assert resolve(metrics["accuracy"].compute)(["a cube"], ["cube"]) == {"accuracy": 1.0}
    assert resolve(metrics["exact_match"].compute)(["Cube"], ["cube"]) == {"exact_match": 1.0}
    # the first key is the headline figure the evaluation reports
    assert next(iter(resolve(metrics["count_mae"].compute)(["4 of them"], ["2"]).items())) == ("mae", 2.0)

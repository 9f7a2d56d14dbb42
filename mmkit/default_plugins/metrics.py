"""The built-in metrics."""

from mmkit import hookimpl
from mmkit.specs import MetricSpec

_M = "mmkit.evaluation.metrics"


@hookimpl
def mmkit_metrics():
    return [
        MetricSpec(name="accuracy", compute=f"{_M}:accuracy", description="label named in the answer (LAMM classification)"),
        MetricSpec(name="exact_match", compute=f"{_M}:exact_match", description="answer equals the reference, case-insensitive"),
        MetricSpec(name="mc_accuracy", compute=f"{_M}:multiple_choice_accuracy", description="LAMM's multiple-choice cascade"),
        MetricSpec(name="count_mae", compute=f"{_M}:count_mae", description="first number in the answer; mean absolute error"),
    ]

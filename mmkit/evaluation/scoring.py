"""Score a predictions file: the same metrics on saved answers, ours or any other system's."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmkit.errors import DataError
from mmkit.plugins import PluginHost, get_host
from mmkit.specs import resolve


def read_predictions(path: Path) -> tuple[list[str], list[Any]]:
    """``prediction`` (a string) and ``reference`` (any JSON) from every record of a JSONL (or JSON
    list) file."""
    from mmkit.data.readers import iter_raw_records

    predictions, references = [], []
    for index, record in iter_raw_records(Path(path)):
        if not isinstance(record, dict) or "prediction" not in record or "reference" not in record:
            raise DataError(str(path), index, "each record needs 'prediction' and 'reference'", kind="schema")
        if not isinstance(record["prediction"], str):
            raise DataError(str(path), index, "'prediction' must be a string", kind="schema")
        predictions.append(record["prediction"])
        references.append(record["reference"])
    return predictions, references


def score_predictions_file(path: Path, metrics: Sequence[str], host: PluginHost | None = None
                           ) -> dict[str, dict[str, float]]:
    host = host or get_host()
    computes = {name: resolve(host.metric(name).compute) for name in metrics}  # unknown names fail first
    predictions, references = read_predictions(path)
    results = {}
    for name, compute in computes.items():
        try:
            results[name] = dict(compute(predictions, references))
        except DataError as exc:
            if exc.source in ("references", "predictions"):  # name the file and record, not the list
                raise DataError(str(path), exc.record, f"{exc.source[:-1]}: {exc.reason} (metric {name})",
                                kind=exc.kind) from None
            raise
    return results

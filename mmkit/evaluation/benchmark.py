"""Run benchmark recipes on a trained model: read the task's data, answer every item through the
training prompt builder (batched generation, or options ranked by likelihood), score, and save the
predictions as JSONL beside the scores so ``mmkit eval score`` reproduces every figure."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from mmkit.records import USER, ReadContext, Sample, Turn, resolve_path
from mmkit.errors import ConfigError, DataError
from mmkit.evaluation.recipe import Generated, Recipe
from mmkit.plugins import PluginHost
from mmkit.specs import resolve

PREDICTIONS = "{task}.predictions.jsonl"
SCORES = "scores.json"


@attrs.frozen
class Item:
    sample: Sample
    reference: Any
    options: tuple[str, ...] = ()
    lettered: bool = False  # options come from the record: a prediction is written "(B) text"


def data_file(recipe: Recipe, *, data_root: Path | None, run_dir: Path | None, work_dir: Path) -> Path:
    """Where the task's data is: generated into ``work_dir``, or the recipe's path (relative to the
    data root, else to the run directory)."""
    if isinstance(recipe.data, Generated):
        root = work_dir / "data" / recipe.name
        root.mkdir(parents=True, exist_ok=True)
        path = Path(resolve(recipe.data.generate)(root, size=recipe.data.size, seed=recipe.data.seed))
    else:
        path = Path(recipe.data)
        if not path.is_absolute():
            path = (data_root or run_dir or Path.cwd()) / path
    if not path.is_file():
        raise ConfigError(f"benchmark {recipe.name} ({recipe.source}): data file not found: {path}"
                          + ("" if data_root else " (relative paths start at --data-root, else the run directory)"))
    return path


def with_synonyms(reference: Any, synonyms: Mapping[str, Sequence[str]]) -> Any:
    """The reference with each label the table names replaced by ``[label, *synonyms]`` (a label
    string, or the ``label`` of an object or of each object of a list); anything else unchanged."""
    if not synonyms:
        return reference
    if isinstance(reference, str):
        found = synonyms.get(reference, synonyms.get(reference.strip().lower()))
        return [reference, *found] if found else reference
    if isinstance(reference, Mapping) and isinstance(reference.get("label"), str):
        return {**reference, "label": with_synonyms(reference["label"], synonyms)}
    if isinstance(reference, list) and all(isinstance(obj, Mapping) for obj in reference):
        return [with_synonyms(obj, synonyms) for obj in reference]
    return reference


def _lamm_records(path: Path) -> list[Any]:
    from mmkit.data.readers import iter_raw_records

    return [rec for _, rec in iter_raw_records(path)]  # a JSON list (as LAMM ships them) or JSONL


def _lamm_items(recipe: Recipe, path: Path, ctx: ReadContext, input_root: Path) -> list[Item]:
    """LAMM-Bench records -> items: the modality placeholder(s), then the instruction."""
    items = []
    needed = recipe.fields()
    synonyms = dict(recipe.synonyms)
    for index, rec in enumerate(_lamm_records(path)):
        source = str(path)
        if not isinstance(rec, dict):
            raise DataError(source, index, "record must be a JSON object", kind="schema")
        rec_id = str(rec.get("id", index))
        missing = sorted(f for f in needed | ({recipe.reference} if isinstance(recipe.reference, str)
                                              else set(recipe.reference)) if f not in rec)
        if missing:
            raise DataError(source, index, f"no field(s) {', '.join(missing)} (the recipe's instruction and "
                                           "reference read them)", record_id=rec_id, kind="schema")
        inputs: dict[str, tuple[str, ...]] = {}
        for key, value in rec.items():
            spec = ctx.modality_for_key(key)
            if spec is None:
                continue
            values = value if isinstance(value, list) else [value]
            inputs[spec.name] = tuple(resolve_path(v, ctx=ctx, base=input_root, source=source, index=index)
                                      for v in values)
        if recipe.modality is not None and recipe.modality not in inputs:
            keys = ", ".join(ctx.modalities[recipe.modality].data_keys) if recipe.modality in ctx.modalities else "?"
            raise DataError(source, index, f"no {recipe.modality} input (expected under: {keys})", record_id=rec_id,
                            kind="schema")
        prefix = "".join((ctx.modalities[m].markers.placeholder + "\n") * len(p) for m, p in inputs.items())
        question = recipe.instruction.format_map({k: rec[k] for k in needed})
        reference = (rec[recipe.reference] if isinstance(recipe.reference, str)
                     else {f: rec[f] for f in recipe.reference})
        reference = with_synonyms(reference, synonyms)
        options: tuple[str, ...] = ()
        lettered = False
        if recipe.mode == "choice":
            if isinstance(recipe.choices, str):
                raw = rec.get(recipe.choices)
                if not isinstance(raw, list) or not raw:
                    raise DataError(source, index, f"field {recipe.choices!r} must be a non-empty list of options",
                                    record_id=rec_id, kind="schema")
                options, lettered = tuple(str(o) for o in raw), True
            else:
                options = tuple(recipe.choices or ())
        sample = Sample(id=rec_id, turns=(Turn(USER, prefix + question),), inputs=inputs, system=recipe.system,
                        source=source, index=index)
        items.append(Item(sample, reference, options, lettered))
    return items


def _conversation_items(recipe: Recipe, path: Path, host: PluginHost, ctx: ReadContext) -> list[Item]:
    from mmkit.data.sources import iter_samples
    from mmkit.evaluation.evaluate import reference

    items = []
    synonyms = dict(recipe.synonyms)
    for sample in iter_samples(host, path, ctx):
        if recipe.system is not None:
            sample = attrs.evolve(sample, system=recipe.system)
        items.append(Item(sample, with_synonyms(reference(sample), synonyms),
                          tuple(recipe.choices or ()) if recipe.mode == "choice" else ()))
    return items


def load_items(recipe: Recipe, host: PluginHost, modalities: Sequence[str], *, data_root: Path | None,
               run_dir: Path | None, work_dir: Path, limit: int | None = None) -> list[Item]:
    path = data_file(recipe, data_root=data_root, run_dir=run_dir, work_dir=work_dir)
    root = data_root or run_dir or Path.cwd()
    input_root = (root / recipe.input_root) if recipe.input_root is not None else path.parent
    # Every installed modality, so an input the model cannot take is reported, not silently dropped.
    ctx = ReadContext(modalities=dict(host.modalities()),
                      data_root=input_root if recipe.input_root is not None else None)
    if recipe.format == "lamm":
        items = _lamm_items(recipe, path, attrs.evolve(ctx, data_root=input_root), input_root)
    else:
        items = _conversation_items(recipe, path, host, ctx)
    if limit is not None:
        items = items[:limit]
    if not items:
        raise ConfigError(f"benchmark {recipe.name}: no items in {path}")
    for item in items:  # the model's modalities: an input it cannot take is an error, never dropped
        extra = sorted(set(item.sample.modalities) - set(modalities))
        if extra:
            raise DataError(item.sample.source, item.sample.index,
                            f"needs modality {', '.join(extra)}; the model has {', '.join(modalities)}",
                            record_id=item.sample.id)
    return items


def predict(model: Any, recipe: Recipe, items: Sequence[Item], *, batch_size: int,
            advance: Callable[[int], None] = lambda n: None) -> list[str]:
    """Answers in item order: greedy generation in batches, or the most likely option."""
    predictions: list[str] = []
    if recipe.mode == "choice":
        from mmkit.evaluation.choice import batch_log_likelihoods, best

        # questions packed until their options fill a batch of `batch_size` rows (one row per option)
        start = 0
        while start < len(items):
            end, rows = start, 0
            while end < len(items) and (end == start or rows + len(items[end].options) <= batch_size):
                rows += len(items[end].options)
                end += 1
            chunk = items[start:end]
            scored = batch_log_likelihoods(model, [(i.sample, i.options) for i in chunk],
                                           mean=recipe.choice_score == "mean")
            for item, scores in zip(chunk, scored, strict=True):
                k = best(scores)
                predictions.append(f"({chr(ord('A') + k)}) {item.options[k]}" if item.lettered else item.options[k])
            advance(len(chunk))
            start = end
        return predictions
    for start in range(0, len(items), batch_size):
        chunk = [item.sample for item in items[start:start + batch_size]]
        predictions += model.generate_batch(chunk, max_new_tokens=recipe.max_new_tokens)
        advance(len(chunk))
    return predictions


def score(metrics: Sequence[str], predictions: Sequence[str], references: Sequence[Any],
          host: PluginHost) -> dict[str, dict[str, float]]:
    return {name: dict(resolve(host.metric(name).compute)(list(predictions), list(references))) for name in metrics}


def write_predictions(path: Path, items: Sequence[Item], predictions: Sequence[str]) -> None:
    from mmkit.atomic import atomic_write_text

    lines = []
    for item, prediction in zip(items, predictions, strict=True):
        row: dict[str, Any] = {"id": item.sample.id, "prediction": prediction, "reference": item.reference}
        if item.options:
            row["options"] = list(item.options)
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + "\n")


def run_benchmark(model: Any, recipes: Sequence[Recipe], out_dir: Path, host: PluginHost, *,
                  data_root: Path | None = None, run_dir: Path | None = None, limit: int | None = None,
                  batch_size: int = 64, progress: Any = None) -> dict[str, Any]:
    """Run every recipe; writes ``<out_dir>/<task>.predictions.jsonl`` and ``<out_dir>/scores.json``."""
    from mmkit.atomic import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise ConfigError(f"two benchmark tasks share a name: {', '.join(sorted(names))}")
    for recipe in recipes:  # fail on an unknown metric or a task the model cannot run before any generation
        for metric in recipe.metrics:
            host.metric(metric)
        if recipe.modality is not None and recipe.modality not in model.modalities:
            raise ConfigError(f"benchmark {recipe.name} ({recipe.source}) needs modality {recipe.modality}; the "
                              f"model has {', '.join(model.modalities)}")
    results: dict[str, Any] = {}
    for recipe in recipes:
        items = load_items(recipe, host, model.modalities, data_root=data_root, run_dir=run_dir,
                           work_dir=out_dir, limit=limit)
        advance: Callable[[int], None] = lambda n: None
        if progress is not None:
            task_id = progress.add_task(recipe.name, total=len(items))
            advance = lambda n, task_id=task_id: progress.advance(task_id, n)  # noqa: E731
        predictions = predict(model, recipe, items, batch_size=batch_size, advance=advance)
        pred_file = out_dir / PREDICTIONS.format(task=recipe.name)
        write_predictions(pred_file, items, predictions)
        results[recipe.name] = {
            "scores": score(recipe.metrics, predictions, [item.reference for item in items], host),
            "n": len(items), "mode": recipe.mode, "recipe": recipe.source, "predictions": pred_file.name,
        }
    atomic_write_text(out_dir / SCORES, json.dumps(results, indent=2))
    return results


def print_benchmark(results: Mapping[str, Any], console: Any, title: str = "benchmark") -> None:
    from rich.table import Table

    table = Table(title=title)
    for column in ("task", "metric", "figure", "value", "n"):
        table.add_column(column, justify="right" if column in ("value", "n") else "left")
    for task, r in results.items():
        for metric, figures in r["scores"].items():
            for k, (figure, value) in enumerate(figures.items()):
                table.add_row(task if k == 0 else "", metric if k == 0 else "", figure, f"{value:.4f}", str(r["n"]))
    console.print(table)

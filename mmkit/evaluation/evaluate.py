"""Held-out evaluation: generate answers, score them, and score them again with the modality input
blanked (the ablation shows whether answers really come through the modality path)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmkit.records import ASSISTANT, ReadContext, Sample
from mmkit.data.sources import iter_samples
from mmkit.plugins import PluginHost, get_host
from mmkit.specs import resolve


def reference(sample: Sample) -> str:
    return next(t.text for t in reversed(sample.turns) if t.role == ASSISTANT)


def predict(model: Any, samples: Sequence[Sample], *, batch_size: int, max_new_tokens: int,
            ablate: Sequence[str] = ()) -> list[str]:
    predictions: list[str] = []
    for start in range(0, len(samples), batch_size):
        predictions += model.generate_batch(samples[start:start + batch_size], max_new_tokens=max_new_tokens,
                                            ablate=ablate)
    return predictions


def evaluate_samples(model: Any, samples: Sequence[Sample], *, metric: str = "accuracy", batch_size: int = 64,
                     max_new_tokens: int = 16, host: PluginHost | None = None,
                     rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Score ``samples``; for samples with modality inputs, also with those inputs blanked. Every
    answer is appended to ``rows`` when given (``id``, ``prediction``, ``reference``, and
    ``ablated_prediction``), for a predictions file ``mmkit eval score`` can re-score."""
    host = host or get_host()
    compute = resolve(host.metric(metric).compute)
    refs = [reference(s) for s in samples]
    preds = predict(model, samples, batch_size=batch_size, max_new_tokens=max_new_tokens)
    scores = compute(preds, refs)
    headline = next(iter(scores))
    # the headline figure's own name (count -> mae, bleu -> bleu4, ...) is recorded: tables read it
    result: dict[str, Any] = {headline: scores[headline], "n": len(samples), "metric": metric, "headline": headline}
    modalities = sorted({m for s in samples for m in s.modalities})
    ablated: list[str] = []
    if modalities:
        ablated = predict(model, samples, batch_size=batch_size, max_new_tokens=max_new_tokens, ablate=modalities)
        result[f"ablated_{headline}"] = compute(ablated, refs)[headline]
        result["ablated_modalities"] = modalities
    if rows is not None:
        for k, (s, r, p) in enumerate(zip(samples, refs, preds, strict=True)):
            rows.append({"id": s.id, "prediction": p, "reference": r,
                         **({"ablated_prediction": ablated[k]} if ablated else {})})
    result["examples"] = [{"id": s.id, "reference": r, "prediction": p}
                          for s, r, p in list(zip(samples, refs, preds, strict=True))[:5]]
    return result


def evaluate_run(output_dir: Path, sources: Mapping[str, Path], *, chance: Mapping[str, float] | None = None,
                 metric: str = "accuracy", batch_size: int = 64, max_new_tokens: int = 16,
                 host: PluginHost | None = None, out_dir: Path | None = None) -> dict[str, Any]:
    """Reload the saved model (so evaluation also proves the save/load path) and score each held-out
    file; writes ``<out_dir>/eval.json`` (default: the run directory, as at the end of training)
    and, with ``out_dir``, each file's answers as ``<out_dir>/<name>.predictions.jsonl``."""
    from mmkit.inference import load
    from mmkit.atomic import atomic_write_text

    host = host or get_host()
    model = load(output_dir, host=host)
    ctx = ReadContext(modalities={m: host.modality(m) for m in model.modalities})
    results = {}
    target = Path(out_dir) if out_dir is not None else Path(output_dir)
    target.mkdir(parents=True, exist_ok=True)
    for name, path in sources.items():
        samples = list(iter_samples(host, Path(path), ctx))
        rows: list[dict[str, Any]] | None = [] if out_dir is not None else None
        results[name] = evaluate_samples(model, samples, metric=metric, batch_size=batch_size,
                                         max_new_tokens=max_new_tokens, host=host, rows=rows)
        if chance and name in chance:
            results[name]["chance"] = chance[name]
        if rows is not None:
            atomic_write_text(target / f"{name}.predictions.jsonl",
                              "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    atomic_write_text(target / "eval.json", json.dumps(results, indent=2))
    return results


def print_eval(results: Mapping[str, Any], console: Any) -> None:
    from rich.table import Table

    table = Table(title="held-out evaluation")
    for column in ("set", "metric", "score", "ablated", "chance", "n"):
        table.add_column(column, justify="left" if column in ("set", "metric") else "right")
    for name, r in results.items():
        metric = r["metric"]
        headline = r.get("headline", metric)  # results written before "headline" was recorded
        ablated = r.get(f"ablated_{headline}")
        shown = metric if headline == metric else f"{metric} ({headline})"
        table.add_row(name, shown, f"{r[headline]:.3f}", "-" if ablated is None else f"{ablated:.3f}",
                      f"{r['chance']:.3f}" if "chance" in r else "-", str(r["n"]))
    console.print(table)

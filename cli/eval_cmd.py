"""``mmkit eval``: score a trained model on held-out data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command(name="eval")(evaluate)


def evaluate(
    output_dir: Annotated[Path, typer.Argument(help="A run's output directory.")],
    data: Annotated[list[Path], typer.Option(help="Held-out file(s) (LLaVA, LAMM or generic); repeatable.")],
    metric: Annotated[str, typer.Option(help="Registered metric (see `mmkit plugins list`).")] = "accuracy",
    batch_size: Annotated[int, typer.Option()] = 64,
    max_new_tokens: Annotated[int, typer.Option()] = 16,
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Generate answers for held-out questions, score them, and score them again with the modality
    inputs blanked (an answer that survives blanking did not come from the modality). Writes
    <output_dir>/eval.json."""
    import json

    from rich.console import Console

    from mmkit.evaluation.evaluate import evaluate_run, print_eval

    results = evaluate_run(output_dir, {p.stem: p for p in data}, metric=metric, batch_size=batch_size,
                           max_new_tokens=max_new_tokens)
    if json_out:
        typer.echo(json.dumps(results, indent=2))
    else:
        print_eval(results, Console())

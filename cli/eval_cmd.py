"""``mmkit eval``: score a trained model on held-out data or benchmark recipes, and score saved
predictions (ours or another system's) with the same metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup


class _EvalGroup(TyperGroup):
    """``mmkit eval RUN ...`` runs the default command (``run``); ``mmkit eval score ...`` the other."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] not in self.commands:
            args = ["run", *args]
        return super().resolve_command(ctx, args)


eval_app = typer.Typer(cls=_EvalGroup, no_args_is_help=True,
                       help="Evaluate a run (held-out data or benchmark recipes); score prediction files.")


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")


@eval_app.command("run")
def evaluate(
    output_dir: Annotated[Path, typer.Argument(help="A run's output directory.")],
    data: Annotated[Optional[list[Path]], typer.Option(
        help="Held-out file(s) (LLaVA, LAMM or generic); repeatable.")] = None,
    benchmark: Annotated[Optional[list[str]], typer.Option(
        help="Benchmark recipe (YAML file), registered benchmark or suite (e.g. demo); repeatable.")] = None,
    metric: Annotated[str, typer.Option(help="--data: registered metric (see `mmkit plugins list`).")] = "accuracy",
    limit: Annotated[Optional[int], typer.Option(help="--benchmark: first N items of each task.")] = None,
    data_root: Annotated[Optional[Path], typer.Option(
        help="--benchmark: where recipes' relative data paths start (default: the run directory).")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Output folder (default RUN/eval/<benchmark or data file names>).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        help="Answers generated per batch (default: the run's eval_batch_size, else 64).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="--data: tokens to generate.")] = 16,
    json_out: Annotated[Optional[str], typer.Option(
        "--json", help="Also write the results as JSON to this file ('-': stdout, instead of the table).")] = None,
) -> None:
    """Generate answers and score them.

    With --data: score held-out files, and again with the modality inputs blanked (an answer that
    survives blanking did not come from the modality); writes eval.json and each file's answers
    (JSONL) into RUN/eval/<file names>/ (the run's own RUN/eval.json stays as training wrote it).

    With --benchmark: run recipes (data + instruction + generation or likelihood choice + metrics)
    through the training prompt builder; writes each task's predictions as JSONL beside scores.json
    in RUN/eval/<benchmark>/ (`mmkit eval score` reproduces every figure from them).
    """
    from rich.console import Console

    from mmkit import ConfigError

    if bool(data) == bool(benchmark):
        raise ConfigError("give --data FILE (held-out evaluation) or --benchmark RECIPE (benchmark), not both"
                          if data else "give --data FILE or --benchmark RECIPE_OR_NAME")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    batch_size = batch_size or _run_eval_batch_size(output_dir)
    to_stdout = json_out == "-"
    console = Console(stderr=to_stdout)
    if data:
        results = _run_held_out(output_dir, data, metric=metric, out=out, batch_size=batch_size,
                                max_new_tokens=max_new_tokens, console=console, show_table=not to_stdout)
    else:
        results = _run_benchmarks(output_dir, benchmark or [], limit=limit, data_root=data_root, out=out,
                                  batch_size=batch_size, console=console, show_table=not to_stdout)
    if json_out:
        _write_json(results, json_out)


def _run_held_out(output_dir: Path, data: list[Path], *, metric: str, out: Path | None, batch_size: int,
                  max_new_tokens: int, console: Any, show_table: bool) -> dict[str, Any]:
    from mmkit import ConfigError, MissingFileError, evaluate, print_eval

    # Results and answer files are keyed by file name: two files of the same name would overwrite
    # each other's, so the clash is refused rather than one file silently not evaluated.
    by_stem: dict[str, Path] = {}
    for path in data:
        if not path.exists():  # before loading the model, and not a raw FileNotFoundError from the reader
            raise MissingFileError(str(path), None, "file not found")
        if path.stem in by_stem:
            raise ConfigError(f"--data {by_stem[path.stem]} and --data {path} have the same name {path.stem!r} "
                              "(results are keyed by file name): rename or copy one of them")
        by_stem[path.stem] = path
    # Never over the run's own eval.json (the end-of-training record): a folder of its own.
    target = out or output_dir / "eval" / "+".join(p.stem for p in data)
    results = evaluate(output_dir, by_stem, metric=metric, batch_size=batch_size,
                       max_new_tokens=max_new_tokens, out_dir=target)
    if show_table:
        print_eval(results, console)
        console.print(f"wrote {target / 'eval.json'} and the answers beside it")
    return results


def _write_json(results: Any, json_out: str) -> None:
    """``--json FILE``: the results written atomically; ``--json -``: printed on stdout."""
    import json

    text = json.dumps(results, indent=2)
    if json_out == "-":
        typer.echo(text)
    else:
        from mmkit import atomic_write_text

        atomic_write_text(Path(json_out), text)


def _run_eval_batch_size(output_dir: Path) -> int:
    """The batch size the run's own evaluation used: left padding makes batch composition part of
    what reproduces a figure to the last digit."""
    import yaml

    try:
        config = yaml.safe_load((output_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return 64
    value = config.get("eval_batch_size") if isinstance(config, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 64


def _run_benchmarks(output_dir: Path, names: list[str], *, limit: int | None, data_root: Path | None,
                    out: Path | None, batch_size: int, console: Any, show_table: bool) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mmkit import BENCHMARK_SCORES, ConfigError, get_host, load, print_benchmark, resolve_benchmark, run_benchmark

    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    if not (output_dir / "model").is_dir() and not (output_dir / "mmkit.json").is_file():
        raise ConfigError(f"{output_dir}: not a run directory (no model/ in it)")
    host = get_host()
    model = load(output_dir, host=host)
    recipes = [r for name in names for r in resolve_benchmark(name, host, model.modalities)]
    label = "+".join(Path(n).stem if n.endswith((".yaml", ".yml")) else n for n in names)
    target = out or output_dir / "eval" / label
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        results = run_benchmark(model, recipes, target, host, data_root=data_root, run_dir=output_dir,
                                limit=limit, batch_size=batch_size, progress=progress)
    if show_table:
        print_benchmark(results, console, title=f"benchmark {label} ({target / BENCHMARK_SCORES})")
    return results


@eval_app.command("score")
def score_file(
    predictions: Annotated[Path, typer.Argument(help="JSONL: one {\"prediction\": ..., \"reference\": ...} per line.")],
    metric: Annotated[list[str], typer.Option(help="Registered metric; repeatable.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Score a predictions file (from `mmkit eval RUN --benchmark`, or any system's answers)."""
    import json

    from mmkit import score_predictions_file

    results = score_predictions_file(predictions, metric)
    if json_out:
        typer.echo(json.dumps(results if len(metric) > 1 else results[metric[0]]))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(predictions))
    for column in ("metric", "figure", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for name, figures in results.items():
        for k, (figure, value) in enumerate(figures.items()):
            table.add_row(name if k == 0 else "", figure, f"{value:.4f}")
    Console().print(table)

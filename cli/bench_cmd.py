"""``mmkit bench``: how fast, against what (``mmkit.bench.suite`` measures, ``report`` prints)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command()(bench)


def bench(
    modalities: Annotated[Optional[str], typer.Option(help="Comma-separated (default: every installed modality).")] = None,
    preset: Annotated[str, typer.Option(help="tiny: the demo's encoders and training step with every ratio "
                                        "(mmkit vs a plain LLaVA-style loop, cached, packed, grouped); small: the step "
                                        "with a ~110M LLM; real: the plugins' realistic encoder presets + the small "
                                        "step.")] = "tiny",
    quick: Annotated[bool, typer.Option(help="Every figure once at tiny sizes (a smoke run, not a measurement).")] = False,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write the figures to this JSON file.")] = None,
    compare: Annotated[Optional[str], typer.Option(help="An earlier --json report: print each figure's change and "
                                                   "exit 1 when one is worse beyond --threshold.")] = None,
    threshold: Annotated[float, typer.Option(help="Tolerated slow-down for --compare (0.2: 20%).")] = 0.2,
) -> None:
    """Measure encoders, projectors and the training step on this machine, each figure repeated
    (median and min-max, items/s), with ratios measured in the same run. For the pytest-benchmark
    suite: pytest benchmarks/ --benchmark-json out.json."""
    import json
    from pathlib import Path

    from rich.console import Console

    from mmkit import (
        bench_regressions,
        compare_bench,
        load_bench_report,
        print_bench_comparison,
        print_bench_report,
        run_bench,
    )

    console = Console()
    base = load_bench_report(compare, preset=preset, quick=quick) if compare else None  # a bad --compare file fails before measuring
    chosen = [m.strip() for m in modalities.split(",") if m.strip()] if modalities else None
    with console.status("measuring") as status:
        report = run_bench(preset, modalities=chosen, quick=quick, progress=lambda msg: status.update(msg))
    print_bench_report(report, console)
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        console.print(f"figures written to {json_out}")
    if base is not None:
        changes, only_base, only_new = compare_bench(base, report)
        flagged = bench_regressions(changes, threshold)
        print_bench_comparison(changes, flagged, only_base, only_new, threshold, console)
        if flagged:
            console.print(f"[red]{len(flagged)} figure(s) worse than {compare} by more than {threshold:.0%}:[/] "
                          + ", ".join(c.name for c in flagged))
            raise typer.Exit(1)

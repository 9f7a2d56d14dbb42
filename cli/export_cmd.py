"""``mmkit export RUN --to FORMAT OUT``: write a trained run in a format other tools load."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("export")(export)


def export(
    run: Annotated[Path | None, typer.Argument(help="A run's output directory (or its model/ folder).",
                                               show_default=False)] = None,
    out: Annotated[Path | None, typer.Argument(help="The folder to write (created; must be empty unless "
                                                    "--overwrite).", show_default=False)] = None,
    to: Annotated[str | None, typer.Option("--to", help="Export format: llava-hf, peft, merged, or a plugin's.",
                                           show_default=False)] = None,
    adapter: Annotated[str | None, typer.Option(help="LoRA adapter to merge (merged, llava-hf) or to export "
                                                     "alone (peft); default: the run's only one.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    list_formats: Annotated[bool, typer.Option("--list", help="List the export formats and exit.")] = False,
) -> None:
    """Export a trained run: `mmkit export RUN --to FORMAT OUT`.

    llava-hf: a LlavaForConditionalGeneration + AutoProcessor folder (image plugin; CLIP + mlp runs).
    peft: each LoRA adapter as a PEFT folder, plus projectors, markers and encoders.
    merged: the base LLM with one adapter merged, a plain Hugging Face causal LM.
    Every export holds a README.md saying how to load it.
    """
    from mmkit import ConfigError, export_run, get_host

    host = get_host()
    if list_formats:
        for name, spec in host.exporters().items():
            typer.echo(f"{name:<12} {spec.description}  [{host.provider('exporter', name)}]")
        return
    if run is None or out is None or to is None:
        raise ConfigError("usage: mmkit export RUN --to FORMAT OUT (formats: "
                          + ", ".join(host.exporters()) + ")")
    files = export_run(run, to, out, adapter=adapter, overwrite=overwrite, host=host)
    total = sum(files.values())
    typer.echo(f"exported {run} as {to} to {out}: {len(files)} files, {_size(total)}")
    for name, size in files.items():
        typer.echo(f"  {name:<48} {_size(size):>10}")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"

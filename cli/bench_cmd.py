"""``mmkit bench``: encoder and projector throughput per modality."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command()(bench)


def bench(
    modalities: Annotated[str | None, typer.Option(help="Comma-separated (default: all installed).")] = None,
    batch_size: Annotated[int, typer.Option()] = 32,
    hidden: Annotated[int, typer.Option(help="LLM hidden size the projector maps to.")] = 4096,
    seconds: Annotated[float, typer.Option(help="Minimum time per measurement.")] = 1.0,
    pretrained: Annotated[list[str] | None, typer.Option(help="MODALITY=HUB_ID_OR_PATH (default: tiny random init).")] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Measure encoder and projector throughput (items/s) on this machine, in one run so the
    figures compare. For the full suite with statistics: pytest benchmarks/."""
    import json

    import torch
    from rich.console import Console
    from rich.table import Table

    from mmkit.bench import bench_modality
    from mmkit.plugins import get_host

    host = get_host()
    chosen = [m.strip() for m in modalities.split(",")] if modalities else list(host.modalities())
    sources = dict(item.split("=", 1) for item in pretrained or [])
    rows = [bench_modality(host, m, batch_size=batch_size, hidden=hidden, min_seconds=seconds, pretrained=sources.get(m))
            for m in chosen]
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"throughput, batch {batch_size}, {torch.get_num_threads()} threads")
    for col in ("modality", "encoder", "projector", "tokens/input", "encoder items/s", "projector items/s"):
        table.add_column(col, justify="left" if col in ("modality", "encoder", "projector") else "right")
    for r in rows:
        table.add_row(r["modality"], r["encoder"], r["projector"], str(r["tokens_per_input"]),
                      f"{r['encoder_items_per_s']:,.0f}", f"{r['projector_items_per_s']:,.0f}")
    Console().print(table)

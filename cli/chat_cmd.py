"""``mmkit chat``: ask a trained model about files, once or in a loop."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(chat)


def parse_inputs(args: list[str], data_keys: dict[str, str]) -> tuple[dict[str, list[str]], list[str]]:
    """Split ``--<data key> PATH`` pairs (repeatable) from the words of the question."""
    from mmkit.errors import ConfigError

    inputs: dict[str, list[str]] = {}
    words: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            modality = data_keys.get(key)
            if modality is None:
                raise ConfigError(f"unknown option {arg}; inputs this model takes: "
                                  + ", ".join(f"--{k}" for k in sorted(data_keys)))
            if not value:
                if i + 1 >= len(args):
                    raise ConfigError(f"{arg} needs a file path")
                i += 1
                value = args[i]
            inputs.setdefault(modality, []).append(value)
        else:
            words.append(arg)
        i += 1
    return inputs, words


def chat(
    ctx: typer.Context,
    output_dir: Annotated[Path, typer.Argument(help="A run's output directory (or its model/ folder).")],
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 64,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
) -> None:
    """Ask a trained model a question about one or more files.

    Give inputs as --<data key> PATH (e.g. --image a.png, --pointcloud b.npy; repeat for several)
    and the question as the remaining words. With no question, starts an interactive loop.
    """
    from rich.console import Console

    from mmkit.inference import load
    from mmkit.plugins import get_host

    host = get_host()
    model = load(output_dir, host=host)
    data_keys = {key: m for m in model.modalities for key in host.modality(m).data_keys}
    inputs, words = parse_inputs(list(ctx.args), data_keys)
    console = Console()
    if words:
        console.print(model.generate(" ".join(words), inputs, system=system, max_new_tokens=max_new_tokens))
        return
    console.print(f"[bold]mmkit chat[/] ({', '.join(model.modalities)}). Attach files with "
                  + ", ".join(f"/{k} PATH" for k in sorted(data_keys)) + "; /quit to leave.")
    pending: dict[str, list[str]] = {m: list(v) for m, v in inputs.items()}
    while True:
        try:
            line = console.input("[bold cyan]you>[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line.startswith("/"):
            key, _, path = line[1:].partition(" ")
            if key not in data_keys or not path.strip():
                console.print(f"[red]unknown command {line!r}[/]")
                continue
            pending.setdefault(data_keys[key], []).append(path.strip())
            console.print(f"attached {path.strip()} as {data_keys[key]}")
            continue
        from mmkit.errors import MmkitError

        try:
            answer = model.generate(line, pending, system=system, max_new_tokens=max_new_tokens)
        except MmkitError as exc:
            console.print(f"[red]error:[/] {exc}")
            continue
        console.print(f"[bold green]mmkit>[/] {answer}")
        pending = {}

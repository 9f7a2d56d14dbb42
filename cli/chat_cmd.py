"""``mmkit chat``: ask a trained model about files, once or in a loop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(chat)


def parse_inputs(args: list[str], data_keys: dict[str, str]) -> tuple[dict[str, list[str]], list[str]]:
    """Split ``--<data key> PATH`` pairs (repeatable) from the words of the question."""
    from mmkit import ConfigError

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
    sample: Annotated[bool, typer.Option("--sample/--greedy", help="Sample tokens instead of taking the most "
                                                                   "likely one.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (with --sample).")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: keep the most likely tokens up to this "
                                              "probability mass (with --sample).")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep only the k most likely tokens, 0 = all (with --sample).")] = 0,
    num_beams: Annotated[int, typer.Option(help="Beam search with this many beams (no streaming).")] = 1,
    repetition_penalty: Annotated[float, typer.Option(help="Above 1 discourages repeating generated tokens.")] = 1.0,
    stop: Annotated[list[str] | None, typer.Option(help="Stop the answer at this text (repeatable).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    stream: Annotated[bool, typer.Option(help="Print tokens as they come.")] = True,
) -> None:
    """Ask a trained model a question about one or more files.

    Give inputs as --<data key> PATH (e.g. --image a.png, --pointcloud b.npy; repeat for several)
    and the question as the remaining words. With no question, starts an interactive loop.
    Greedy decoding by default; --sample with --temperature/--top-p/--top-k, --num-beams,
    --repetition-penalty and --stop change it.
    """
    from rich.console import Console

    from mmkit import GenerationOptions, get_host, load

    options = GenerationOptions(max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, top_p=top_p,
                                top_k=top_k, num_beams=num_beams, repetition_penalty=repetition_penalty,
                                stop=tuple(stop or ()), seed=seed)  # checked before the model loads
    host = get_host()
    model = load(output_dir, host=host)
    data_keys = {key: m for m in model.modalities for key in host.modality(m).data_keys}
    inputs, words = parse_inputs(list(ctx.args), data_keys)
    console = Console(highlight=False)
    answer = _answerer(model, console, system=system, options=options, streaming=stream and num_beams == 1)
    if words:
        answer(" ".join(words), inputs)
        return
    _interactive(console, model, data_keys, inputs, answer)


def _answerer(model: Any, console: Any, *, system: str | None, options: Any,
              streaming: bool) -> Callable[..., None]:
    """``answer(question, attached, prefix="")``: prints the model's answer, token by token when streaming."""

    def answer(question: str, attached: dict[str, list[str]], prefix: str = "") -> None:
        if not streaming:
            console.print(prefix + model.generate(question, attached, system=system, options=options))
            return
        console.print(prefix, end="")
        answer_streamed(model, question, attached, system=system, options=options,
                        write=lambda text: console.print(text, end="", markup=False))
        console.print()

    return answer


def _interactive(console: Any, model: Any, data_keys: dict[str, str], inputs: dict[str, list[str]],
                 answer: Callable[..., None]) -> None:
    """The chat loop: ``/<data key> PATH`` attaches a file to the next question, ``/quit`` leaves; the
    files given on the command line go with the first question."""
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
            _attach(console, line, data_keys, pending)
            continue
        from mmkit import MmkitError

        try:
            answer(line, pending, prefix="[bold green]mmkit>[/] ")
        except MmkitError as exc:
            console.print(f"\n[red]error:[/] {exc}")
            continue
        pending = {}


def _attach(console: Any, line: str, data_keys: dict[str, str], pending: dict[str, list[str]]) -> None:
    """``/<data key> PATH``: the file joins ``pending`` under its modality (else the command is unknown)."""
    key, _, path = line[1:].partition(" ")
    if key not in data_keys or not path.strip():
        console.print(f"[red]unknown command {line!r}[/]")
        return
    pending.setdefault(data_keys[key], []).append(path.strip())
    console.print(f"attached {path.strip()} as {data_keys[key]}")


def answer_streamed(model, question, inputs, *, system, options, write) -> str:
    """Generate in a worker thread and hand each piece of text to ``write`` as it is decoded;
    returns the whole answer. An error in the worker is raised here."""
    import threading

    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict[str, object] = {}

    def work() -> None:
        try:
            result["answer"] = model.generate(question, inputs, system=system, options=options, streamer=streamer)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc
            streamer.end()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    stops = options.stop
    hold = max((len(s) for s in stops), default=1) - 1
    text, shown, stopped = "", 0, False
    for piece in streamer:
        if stopped:
            continue
        text += piece
        # Stop strings are cut from the answer: hold back text that may be the start of one.
        cut = min((text.index(s) for s in stops if s in text), default=None)
        end = cut if cut is not None else max(shown, len(text) - hold)
        if end > shown:
            write(text[shown:end])
            shown = end
        stopped = cut is not None
    worker.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    if not stopped and len(text) > shown:
        write(text[shown:])
    return str(result["answer"])

"""``mmkit data validate`` and ``mmkit data inspect``: check instruction data before training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

data_app = typer.Typer(help="Inspect and check instruction data.", no_args_is_help=True,
                       context_settings={"help_option_names": ["-h", "--help"]})


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


def _keyed_ints(items: list[str] | None) -> dict[str, int]:
    from mmkit import ConfigError

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(f"--tokens-per-input {item!r}: expected MODALITY=N")
    return out


CONFIG_HELP = ("YAML file of `mmkit train` options: the run's encoders, encoder_pretrained, encoder_options, "
               "projectors and projector_options count each input as training will (and llm, template, max_length, "
               "modalities, data_root, data_format stand in for the flags not given).")
SET_HELP = ("A train option as KEY=VALUE (VALUE is YAML), as `mmkit train --set`; dotted keys reach nested options, "
            "e.g. encoder_options.image.anyres=true.")


def _run_config(config: Path | None, assignments: list[str] | None, llm: str | None) -> Any:
    """The train configuration ``--config`` and ``--set`` describe (``None``: neither given), parsed
    by the train command's own rules; ``--llm`` counts as the run's LLM."""
    if config is None and not assignments:
        return None
    from mmkit import parse_assignments, resolve_config

    overrides = parse_assignments(assignments)
    if llm is not None:
        overrides["llm"] = llm
    return resolve_config(config, overrides)


def _choices(cfg: Any, chosen: list[str]) -> Any:
    """Per modality, the encoder and projector the run would use (``None``: the tiny defaults)."""
    if cfg is None:
        return None
    from mmkit import encoder_choices

    return encoder_choices(chosen, encoders=cfg.encoders, encoder_pretrained=cfg.encoder_pretrained,
                           encoder_options=cfg.encoder_options, projectors=cfg.projectors,
                           projector_options=cfg.projector_options)


def _modalities(modalities: str | None, cfg: Any, host: Any) -> list[str]:
    if modalities:
        return [m.strip() for m in modalities.split(",") if m.strip()]
    if cfg is not None and cfg.modalities:
        return list(cfg.modalities)
    return list(host.modalities())


@data_app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Data files (LLaVA, LAMM or generic JSON / JSONL).")],
    data_root: Annotated[Path | None, typer.Option(
        help="Root for relative input paths (default: each file's folder).")] = None,
    allow_outside_root: Annotated[bool, typer.Option(help="Accept input paths outside the data root.")] = False,
    data_format: Annotated[str | None, typer.Option(help="Reader name (default: detect per file).")] = None,
    modalities: Annotated[str | None, typer.Option(help="Comma-separated modalities (default: all installed).")] = None,
    llm: Annotated[str | None, typer.Option(help="LLM whose tokenizer measures lengths (hub id or path). "
                                                 "Without it the length check is skipped.")] = None,
    max_length: Annotated[int | None, typer.Option(
        help="Maximum tokens per sample, modality tokens included (default: --config's max_length, else 2048).",
        show_default=False, min=1)] = None,
    tokens_per_input: Annotated[list[str] | None, typer.Option(
        help="MODALITY=N tokens one input becomes (default: the run's encoder and projector from --config / --set, "
             "else the modality's default ones in their tiny configuration).")] = None,
    config: Annotated[Path | None, typer.Option(help=CONFIG_HELP)] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
    template: Annotated[str | None, typer.Option(
        help="Prompt template: a library name or a Jinja file (default: the tokenizer's own).")] = None,
    decode: Annotated[bool, typer.Option(help="Decode every input file (--no-decode: only check they exist).")] = True,
    workers: Annotated[int | None, typer.Option(help="Processes decoding files (default: CPU count).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the full per-record report as JSON.")] = False,
    show: Annotated[int, typer.Option(help="Issues listed after the summary.", min=0)] = 20,
) -> None:
    """Check every record before training: schema, turn order, one placeholder per input, paths
    inside the data root, input files present and decodable (in parallel), unknown keys, and with
    --llm the encode check training runs (template, answers located, length with modality tokens).
    Inputs are preprocessed and counted with the run's encoders when --config / --set name them.
    Exits 1 when any record has an error."""
    import json

    from rich.console import Console

    from mmkit import get_host, prompt_lengths_for, validate_data

    _keyed_ints(tokens_per_input)  # a malformed value is refused even when no --llm uses it
    cfg = _run_config(config, set_, llm)
    if cfg is not None:
        llm, template = llm or cfg.llm, template or cfg.template
        max_length = max_length if max_length is not None else cfg.max_length
        data_root = data_root or (Path(cfg.data_root) if cfg.data_root else None)
        data_format, allow_outside_root = data_format or cfg.data_format, allow_outside_root or cfg.allow_outside_root
    host = get_host()
    chosen = _modalities(modalities, cfg, host)
    choices = _choices(cfg, chosen)
    lengths = None
    if llm is not None:
        lengths = prompt_lengths_for(llm, {m: host.modality(m).markers for m in chosen},
                                     _counts(host, chosen, tokens_per_input, choices), template=template,
                                     max_length=max_length if max_length is not None else 2048, choices=choices)
    err = Console(stderr=True)
    with err.status("validating", spinner="dots") as status:
        report = validate_data([str(f) for f in files], host=host, modalities=chosen, data_root=data_root,
                                allow_outside_root=allow_outside_root, data_format=data_format, lengths=lengths,
                                decode_files=decode, workers=workers, status=lambda msg: status.update(msg),
                                # load + the run's (default: tiny) encoder's preprocess, as training runs them
                                preprocess=decode, choices=choices)
    if json_out:
        typer.echo(json.dumps(report.to_json(), indent=1))
    else:
        print_report(report, Console(), show=show)
    if not report.ok:
        raise typer.Exit(1)


def _counts(host, chosen: list[str], tokens_per_input: list[str] | None, choices: Any = None
            ) -> dict[str, int | None]:
    """Per modality the slots one input gets (``None``: counted per input): --tokens-per-input, else
    the chosen encoder and projector's."""
    from mmkit import default_tokens_per_input

    given = _keyed_ints(tokens_per_input)
    missing = [m for m in chosen if m not in given]
    return {**default_tokens_per_input(host, missing, choices), **given} if missing else given


@data_app.command()
def inspect(
    files: Annotated[list[Path], typer.Argument(help="Data files (any format a reader recognises).")],
    llm: Annotated[str | None, typer.Option(
        help="LLM whose tokenizer encodes the records (hub id or local path; default: --config's llm).")] = None,
    template: Annotated[str | None, typer.Option(
        help="Prompt template: a library name or a Jinja file (default: the tokenizer's own).")] = None,
    limit: Annotated[int, typer.Option(help="Records shown (from the start of the first file).")] = 3,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per record, one per line.")] = False,
    modalities: Annotated[str | None, typer.Option(help="Comma-separated modalities (default: all installed).")] = None,
    tokens_per_input: Annotated[list[str] | None, typer.Option(
        help="MODALITY=N slots one input becomes (default: the run's encoder and projector from --config / --set, "
             "else the modality's default ones in their tiny configuration; LLaVA-1.5's CLIP ViT-L/14-336 gives "
             "576).")] = None,
    max_length: Annotated[int | None, typer.Option(
        help="Maximum tokens per sample (default: --config's max_length, else no limit).")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Root for relative input paths.")] = None,
    data_format: Annotated[str | None, typer.Option(help="Reader name (default: detect per file).")] = None,
    config: Annotated[Path | None, typer.Option(help=CONFIG_HELP)] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
) -> None:
    """Show what training feeds the model: per record the rendered sequence with the supervised
    spans marked (between \u00ab and \u00bb) and slot runs collapsed, token counts, and the
    inference prompt. --json: id, input_ids, labels, supervised_text, slots per record. Slots
    come from the run's encoders when --config / --set name them (an any-resolution image: its own count)."""
    import json

    from rich.console import Console

    from mmkit import ConfigError, check_template, get_host, inspect_record, iter_records

    cfg = _run_config(config, set_, llm)
    if cfg is not None:
        llm, template = llm or cfg.llm, template or cfg.template
        max_length = max_length if max_length is not None else cfg.max_length
        data_root = data_root or (Path(cfg.data_root) if cfg.data_root else None)
        data_format = data_format or cfg.data_format
    if llm is None:
        raise ConfigError("data inspect needs the LLM whose tokenizer encodes the records: give --llm "
                          "(or llm in the --config file)")
    check_template(llm, template)  # before any plugin or tokenizer loads
    host = get_host()
    chosen = _modalities(modalities, cfg, host)
    choices = _choices(cfg, chosen)
    prompts, counter = _record_encoding(host, chosen, llm, template=template, max_length=max_length,
                                        tokens_per_input=tokens_per_input, choices=choices)
    console = Console(highlight=False, soft_wrap=True)
    if not json_out:
        _print_template(console, prompts)
    failed = 0
    for sample in iter_records(host, [str(f) for f in files], chosen, data_root=str(data_root) if data_root else None,
                               data_format=data_format, limit=limit):
        entry = inspect_record(prompts, sample, counter)
        encoded = entry.pop("_encoded", None)
        failed += "error" in entry
        if json_out:
            typer.echo(json.dumps(entry, ensure_ascii=False))
        else:
            _print_record(console, prompts, sample, entry, encoded)
    if failed:
        raise typer.Exit(1)


def _record_encoding(host: Any, chosen: list[str], llm: str, *, template: str | None, max_length: int | None,
                     tokens_per_input: list[str] | None, choices: Any) -> tuple[Any, Any]:
    """The prompt builder training would use, and the counter of a variable-size modality's inputs
    (preprocessed and counted with the run's encoder; ``None`` when every count is fixed)."""
    from mmkit import InputTokenCounter, prompt_builder_for

    prompts = prompt_builder_for(llm, {m: host.modality(m).markers for m in chosen},
                                 _counts(host, chosen, tokens_per_input, choices), template=template,
                                 max_length=max_length)
    variable = prompts.variable_modalities
    return prompts, InputTokenCounter(variable, choices=choices) if variable else None


def _print_template(console: Any, prompts: Any) -> None:
    console.print(f"template: {prompts.describe_template()}; stop tokens: "
                  + ", ".join(repr(prompts.tokenizer.convert_ids_to_tokens(i)) for i in sorted(prompts.stop_token_ids)))


def _print_record(console: Any, prompts: Any, sample: Any, entry: dict[str, Any], encoded: Any) -> None:
    """One record as ``data inspect`` shows it: the marked sequence, its counts and the inference prompt
    (or the reason it does not encode)."""
    from rich.text import Text

    console.rule(f"{sample.source} record {sample.index} (id {sample.id})")
    if encoded is None:
        console.print(f"[red]error[/] ({entry['kind']}): {entry['error']}")
        return
    console.print(_sequence_text(prompts, encoded))
    slots = ", ".join(f"{m}: {runs}" for m, runs in entry["slots"].items()) or "none"
    console.print(f"[dim]{entry['tokens']} tokens, {entry['supervised_tokens']} supervised in "
                  f"{len(entry['supervised_text'])} span(s); slots per input: {slots}[/]")
    console.print("[dim]inference prompt:[/]")
    console.print(Text(entry["prompt"]))


def _sequence_text(prompts: Any, encoded: Any) -> Any:
    """The rendered sequence: slot runs collapsed, supervised spans between \u00ab and \u00bb."""
    from rich.text import Text

    from mmkit import prompt_segments

    text = Text()
    for seg in prompt_segments(prompts, encoded):
        if seg.kind == "slots":
            text.append(f"[{seg.text} x{seg.count}]", style="cyan")
        elif seg.kind == "supervised":
            text.append("\u00ab" + seg.text + "\u00bb", style="bold green")
        else:
            text.append(seg.text)
    return text


def print_report(report, console, *, show: int = 20) -> None:
    from rich.table import Table

    table = Table(title="mmkit data validate")
    for col in ("file", "reader", "records", "ok", "with errors", "with warnings"):
        table.add_column(col, justify="left" if col in ("file", "reader") else "right")
    for f in report.files:
        table.add_row(f.file, f.reader or "-", f"{f.records:,}", f"{f.ok:,}",
                      f"[red]{f.with_errors:,}[/]" if f.with_errors else "0",
                      f"[yellow]{f.with_warnings:,}[/]" if f.with_warnings else "0")
    console.print(table)
    kinds = report.kind_counts()
    if kinds:
        by_kind = Table(title="issues by kind")
        for col in ("severity", "kind", "count", "first"):
            by_kind.add_column(col, justify="right" if col == "count" else "left", overflow="fold")
        for severity, kind, count, first in kinds:
            colour = "red" if severity == "error" else "yellow"
            by_kind.add_row(f"[{colour}]{severity}[/]", kind, f"{count:,}", first)
        console.print(by_kind)
    ordered = report.errors + report.warnings
    for issue in ordered[:show]:
        colour = "red" if issue.severity == "error" else "yellow"
        console.print(f"[{colour}]{issue.severity}[/] {issue.message()}", highlight=False, soft_wrap=True)
    if len(ordered) > show:
        console.print(f"... and {len(ordered) - show:,} more (--json lists every record)")
    for note in report.notes:
        console.print(f"[dim]note: {note}[/]")
    verdict = "[green]OK[/]" if report.ok else f"[red]{len(report.errors):,} error(s)[/]"
    console.print(f"{verdict}: {report.num_records:,} records, {report.inputs_checked:,} input files checked, "
                  f"{len(report.warnings):,} warning(s), {report.seconds:.1f} s")

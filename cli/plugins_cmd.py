"""``mmkit plugins list|hooks|check`` and ``mmkit plugin new``.

Imported on every ``mmkit`` start, so module level stays light (typer only): rich, the plugin
host and the scaffold are imported inside the commands.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from mmkit import PluginHost

plugins_app = typer.Typer(help="Inspect and check installed plugins.", no_args_is_help=True)
plugin_app = typer.Typer(help="Create a new plugin package.", no_args_is_help=True)

#: registry kind -> the key used in ``plugins list --json``.
REGISTRY_KEYS = {"modality": "modalities", "encoder": "encoders", "projector": "projectors",
                 "reader": "readers", "metric": "metrics", "exporter": "exporters", "benchmark": "benchmarks"}
HOOK_REFERENCE_TITLE = "## Hook reference"


# -- plugins list ----------------------------------------------------------------------------------
def plugin_rows(host: PluginHost) -> list[dict[str, Any]]:
    """Every plugin record with what it registered (building the registry first, because that is
    when registration hooks run and can fail)."""
    registry = host.registry
    rows = []
    for record in host.records.values():
        row = record.as_dict()
        row["registered"] = {
            key: sorted(name for name, reg in registry[kind].items() if reg.plugin == record.name)
            for kind, key in REGISTRY_KEYS.items()
        }
        rows.append(row)
    return rows


@plugins_app.command("list")
def list_plugins(as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """List every plugin: distribution, version, hooks, status and import time."""
    from mmkit import get_host

    rows = plugin_rows(get_host())
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"mmkit plugins ({len(rows)})", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("Name (source)", overflow="fold")
    table.add_column("Distribution", overflow="fold")
    table.add_column("Hooks: registers", min_width=20, overflow="fold")
    table.add_column("Status", no_wrap=True)
    table.add_column("Import ms", justify="right")
    for row in rows:
        status = "[green]ok[/]" if row["status"] == "ok" else "[red]failed[/]"
        table.add_row(f"{row['name']}\n[dim]{row['source']}[/]", f"{row['distribution']} {row['version']}".strip(),
                      _provides(row) or "-", status, f"{row['import_ms']:.1f}")
    console = Console()
    console.print(table)
    # Errors go below the table: they are long, and a folded column of them is unreadable.
    for row in rows:
        if row["status"] != "ok":
            where = f"{escape(row['name'])} ({escape(row['distribution'])})"
            console.print(f"[red]{where}[/]: {escape(row['error'] or '')}", highlight=False)


def _provides(row: dict[str, Any]) -> str:
    """One line per hook: ``modalities: image`` for registration hooks, the bare name otherwise."""
    lines = []
    for hook in row["hooks"]:
        short = hook.removeprefix("mmkit_")
        key = "readers" if short == "dataset_readers" else short
        names = row["registered"].get(key)
        lines.append(f"{short}: {', '.join(names)}" if names else short)
    return "\n".join(lines)


# -- plugins hooks ---------------------------------------------------------------------------------
class _Verbatim:
    """An annotation printed as written: hookspecs uses string annotations (``from __future__
    import annotations``), which ``inspect`` would otherwise render in quotes."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def hook_signature(func: Any) -> str:
    """``name(params) -> return``, as ``inspect.signature`` renders it minus the quotes."""
    sig = inspect.signature(func)

    def clean(annotation: Any) -> Any:
        return _Verbatim(annotation) if isinstance(annotation, str) else annotation

    sig = sig.replace(parameters=[p.replace(annotation=clean(p.annotation)) for p in sig.parameters.values()],
                      return_annotation=clean(sig.return_annotation))
    return f"{func.__name__}{sig}"


def hook_specs() -> list[dict[str, Any]]:
    """The hook specs in ``mmkit.hookspecs``, in the order they are defined there."""
    from mmkit import hookspecs

    marker = f"{hookspecs.PROJECT}_spec"  # where pluggy's HookspecMarker stores its options
    specs = []
    for name, func in vars(hookspecs).items():
        opts = getattr(func, marker, None)
        if not inspect.isfunction(func) or opts is None:
            continue
        specs.append({
            "name": name,
            "signature": hook_signature(func),
            "firstresult": bool(opts.get("firstresult")),
            "historic": bool(opts.get("historic")),
            "doc": inspect.getdoc(func) or "",
        })
    return specs


def _doc_to_markdown(doc: str) -> str:
    """Docstring reST to Markdown: ``:role:`x``` -> ```x```, ``Example::`` blocks -> fenced code."""
    doc = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", doc)
    doc = doc.replace("``", "`")
    out: list[str] = []
    lines = doc.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::"):
            out.append(line.rstrip()[:-1])  # "Example::" -> "Example:"
            i += 1
            while i < len(lines) and not lines[i].strip():
                i += 1
            block = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("    ")):
                block.append(lines[i][4:])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            out += ["", "```python", *block, "```", ""]
            continue
        out.append(line)
        i += 1
    return "\n".join(out).strip()


_FLAG_NOTES = {
    "firstresult": "`firstresult=True`: implementations are asked in turn; the first non-`None` answer wins.",
    "historic": "`historic=True`: a plugin registered later is still called with earlier calls' arguments.",
}


def render_hook_reference() -> str:
    """The hook reference section of docs/plugins.md (``mmkit plugins hooks --markdown``)."""
    from mmkit import hookspecs

    parts = [
        HOOK_REFERENCE_TITLE,
        "",
        f"Generated by `mmkit plugins hooks --markdown` from `mmkit/hookspecs.py` (hook API "
        f"{hookspecs.HOOK_API_VERSION}); `tests/test_docs.py` fails when the two differ.",
    ]
    for spec in hook_specs():
        parts += ["", f"### `{spec['name']}`", "", "```python", spec["signature"], "```", ""]
        parts += [_FLAG_NOTES[flag] + "\n" for flag in _FLAG_NOTES if spec[flag]]
        parts.append(_doc_to_markdown(spec["doc"]))
    return "\n".join(parts) + "\n"


@plugins_app.command("hooks")
def list_hooks(
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the hook reference of docs/plugins.md."),
) -> None:
    """Show the hook specs plugins can implement, with their signatures and documentation."""
    if as_json:
        typer.echo(json.dumps(hook_specs(), indent=2))
        return
    if markdown:
        typer.echo(render_hook_reference(), nl=False)
        return
    from rich.console import Console
    from rich.markdown import Markdown
    from rich.markup import escape

    console = Console()
    for spec in hook_specs():
        flags = "".join(f" [dim]({flag})[/]" for flag in _FLAG_NOTES if spec[flag])
        console.print(f"[bold cyan]{escape(spec['signature'])}[/]{flags}")
        console.print(Markdown(_doc_to_markdown(spec["doc"])))
        console.print()


# -- plugins check ---------------------------------------------------------------------------------
def find_problems(host: PluginHost, *, deep: bool = False) -> list[str]:
    """Everything wrong with the installed plugins, each naming the plugin and its distribution."""
    problems = list(host.check())  # failed imports/registrations, duplicates, dangling refs, versions
    for record in host.records.values():
        if record.status == "ok" and not record.hooks:
            problems.append(f"{record.name} ({record.distribution}): implements no hooks "
                            "(are its functions decorated with @mmkit.hookimpl?)")
    if deep:
        problems += host.verify_lazy()
        from mmkit import check_encoders  # builds each tiny encoder once: shapes, identity()

        problems += check_encoders(host)
    return [_name_distribution(problem, host) for problem in problems]


def _name_distribution(problem: str, host: PluginHost) -> str:
    """Some host messages start with ``plugin: ...``; add the distribution the user would uninstall."""
    name, sep, rest = problem.partition(": ")
    record = host.records.get(name)
    if sep and record is not None and "(" not in name:
        return f"{name} ({record.distribution}): {rest}"
    return problem


@plugins_app.command("check")
def check_plugins(
    deep: bool = typer.Option(False, "--deep", help="Also import every lazy reference and build each tiny encoder "
                                                    "once to check its declared shapes and identity() (loads torch)."),
) -> None:
    """Load every plugin and report what is wrong; exits 1 if anything is."""
    from mmkit import get_host

    host = get_host()
    problems = find_problems(host, deep=deep)
    if not problems:
        typer.secho(f"all {len(host.records)} plugins OK" + (" (lazy references resolved)" if deep else ""),
                    fg="green")
        return
    typer.secho(f"{len(problems)} problem(s) in {len(host.records)} plugins:", fg="red", err=True)
    for problem in problems:
        typer.echo(f"  - {problem}", err=True)
    # SystemExit, not typer.Exit: mmkit's main() runs the app with standalone_mode=False, where a
    # typer.Exit code is returned rather than used as the process status.
    raise SystemExit(1)


# -- plugin new ------------------------------------------------------------------------------------
@plugin_app.command("new")
def new_plugin(
    name: str = typer.Argument(..., help="Distribution name, e.g. mmkit-plugin-sonar."),
    directory: Path = typer.Option(Path("."), "--dir", help="Folder to create the package in."),
    modality: str | None = typer.Option(None, "--modality",
                                        help="Modality name (default: NAME without 'mmkit-plugin-')."),
    variable: bool = typer.Option(False, "--variable",
                                  help="A variable-size encoder: the token count follows each input (contract 1.1)."),
) -> None:
    """Generate a working modality plugin package (loader, encoder, demo task, contract tests)."""
    from mmkit import create_plugin, plugin_names

    names = plugin_names(name, modality)
    target = create_plugin(name, directory, modality=modality, variable=variable)
    typer.secho(f"created {target}", fg="green")
    typer.echo(f"  distribution {names.distribution}, package {names.package}, modality {names.modality!r}")
    try:
        from mmkit import get_host

        owner = get_host().registry["modality"].get(names.modality)
    except Exception:  # only a hint: a broken host must not fail scaffolding
        owner = None
    if owner is not None:
        typer.secho(f"  note: modality {names.modality!r} is already registered by plugin {owner.plugin!r}; "
                    "installing both is an error. Pass --modality to pick another name.", fg="yellow")
    typer.echo("next steps:")
    typer.echo(f"  pip install -e '{target}[test]'")
    typer.echo(f"  pytest {target / 'tests'}")
    typer.echo("  mmkit plugins list")

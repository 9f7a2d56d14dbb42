"""Entry point of the ``mmkit`` command. Keep imports here light: no torch on the --help path;
each command imports what it needs when it runs."""

from __future__ import annotations

import sys

import typer

from mmkit import MmkitError

app = typer.Typer(help="mmkit: build multimodal LLMs out of pip-installable modality plugins.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False,
                  context_settings={"help_option_names": ["-h", "--help"]})


def _version(value: bool) -> None:
    if value:
        from mmkit import __version__
        from mmkit.plugins import DISTRIBUTION

        typer.echo(f"mmkit {__version__} ({DISTRIBUTION})")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """mmkit: build multimodal LLMs out of pip-installable modality plugins."""


def _register_commands() -> None:
    from mmkit_cli import plugins_cmd

    app.add_typer(plugins_cmd.plugins_app, name="plugins")
    app.add_typer(plugins_cmd.plugin_app, name="plugin")
    for module_name in ("train_cmd", "chat_cmd", "eval_cmd", "bench_cmd", "data_cmd", "export_cmd"):
        try:
            module = __import__(f"mmkit_cli.{module_name}", fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != f"mmkit_cli.{module_name}":
                raise
            continue
        module.register(app)
    # Plugins may add commands; a broken one is reported by `mmkit plugins list`, not fatal here.
    from mmkit import get_host

    get_host().add_commands(app)


def main() -> None:
    # Typer runs in standalone mode (usage errors exit 2 with a message, typer.Exit keeps its
    # code); mmkit's own errors are user-facing and print without a traceback.
    try:
        _register_commands()
        app()
    except MmkitError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(1)

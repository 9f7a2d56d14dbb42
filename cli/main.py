"""Entry point of the ``mmkit`` command. Keep imports here light: no torch on the --help path;
each command imports what it needs when it runs."""

from __future__ import annotations

import sys

import typer

from mmkit.errors import MmkitError

app = typer.Typer(help="mmkit: build multimodal LLMs out of pip-installable modality plugins.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False)


def _register_commands() -> None:
    from mmkit_cli import plugins_cmd

    app.add_typer(plugins_cmd.plugins_app, name="plugins")
    app.add_typer(plugins_cmd.plugin_app, name="plugin")
    for module_name in ("train_cmd", "chat_cmd", "eval_cmd", "bench_cmd", "data_cmd"):
        try:
            module = __import__(f"mmkit_cli.{module_name}", fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != f"mmkit_cli.{module_name}":
                raise
            continue
        module.register(app)
    # Plugins may add commands; a broken one is reported by `mmkit plugins list`, not fatal here.
    from mmkit.plugins import get_host

    get_host().add_commands(app)


def main() -> None:
    _register_commands()
    try:
        app(standalone_mode=False)
    except MmkitError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(1)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise

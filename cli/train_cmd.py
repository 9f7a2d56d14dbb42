"""``mmkit train``.

Its options are derived from :class:`~mmkit.training.config.TrainConfig`: every field declared with
``flag=`` gets an option whose help is the field's own, plus the values it accepts and its default;
any field can be set with ``--set KEY=VALUE`` (dotted keys reach nested options). Values arrive as
text and are parsed by the config, so every bad value is reported at once, naming the field.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any, Optional

import typer

#: exit status of a configuration error (as for a command-line usage error)
CONFIG_ERROR_EXIT = 2


def register(app: typer.Typer) -> None:
    app.command(name="train", context_settings={"help_option_names": ["-h", "--help"]})(_command())


def _split(values: list[str]) -> str:
    return ",".join(values)


def _keyed(items: list[str], what: str) -> dict[str, str]:
    """``modality=value`` pairs."""
    from mmkit import ConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} {item!r}: expected MODALITY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _metavar(tp: Any) -> str:
    return {int: "INT", float: "FLOAT", str: "TEXT"}.get(tp, "TEXT")


def _flag_name(field: Any) -> str:
    """A flagged field's option: ``flag=`` when it names one, else the field's name with dashes."""
    flag = field.metadata["flag"]
    return "--" + (flag if isinstance(flag, str) else field.name.replace("_", "-"))


def _option(field: Any) -> tuple[Any, Any]:
    """``(annotation, typer.Option)`` of a TrainConfig field with a flag."""
    from mmkit import TRAIN_DEMO_DEFAULTS as DEMO_DEFAULTS
    from mmkit import config_field_accepts as accepted
    from mmkit import config_field_type as base_type

    name = _flag_name(field)
    tp, _ = base_type(field.type)
    help_text = field.metadata["help"]
    origin = typing.get_origin(tp)
    if tp is bool:
        return Optional[bool], typer.Option(None, f"{name}/--no-{name[2:]}", help=help_text, show_default=False)
    if origin in (tuple, dict):
        metavar = "MODALITY=VALUE" if origin is dict else "TEXT"
        return Optional[list[str]], typer.Option(None, name, help=help_text, metavar=metavar, show_default=False)
    check = field.metadata.get("check")
    if check is not None and not check.choices:
        help_text += f" Accepts {accepted(field)}."
    default = field.default
    if isinstance(default, (int, float, str)) and default != "":
        shown = f"default {default}"
        if field.name in DEMO_DEFAULTS and DEMO_DEFAULTS[field.name] != default:
            shown += f"; demo {DEMO_DEFAULTS[field.name]}"
        help_text += f" ({shown})"  # parentheses: rich would read [..] as markup
    metavar = "|".join(map(str, check.choices)) if check is not None and check.choices else _metavar(tp)
    return Optional[str], typer.Option(None, name, help=help_text, metavar=metavar, show_default=False)


def _command() -> Any:
    """The ``train`` callback with one keyword parameter per flagged field (typer reads the
    signature), plus ``--config`` and ``--set``."""
    import attrs

    from mmkit import TrainConfig

    params = []
    for field in attrs.fields(TrainConfig):
        if field.metadata.get("flag"):
            annotation, default = _option(field)
            params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=annotation))
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                    default=typer.Option(None, help="YAML file of options; flags override it.")))
    params.append(inspect.Parameter(
        "set_", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[list[str]],
        default=typer.Option(None, "--set", help="Any option as KEY=VALUE (VALUE is YAML); dotted keys reach "
                                                 "nested options, e.g. encoder_options.image.feature_layer=-2.")))
    params.append(inspect.Parameter(
        "dry_run", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
        default=typer.Option(False, "--dry-run", help="Build the model on the meta device from its configs (no "
                                                      "weights) and print parameters, tokens per sample and memory "
                                                      "per GPU per ZeRO stage for --num-procs GPUs; train nothing.")))
    params.append(inspect.Parameter("json_", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                    default=typer.Option(False, "--json", help="With --dry-run: one JSON object.")))

    def train(**options: Any) -> None:
        """Assemble an LLM with the chosen modalities and train it with DeepSpeed.

        With no --llm/--data it trains the embedded demo on this machine and evaluates it.
        """
        _train(options)

    train.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return train


def overrides_from(options: dict[str, Any]) -> dict[str, Any]:
    """The command line's values by field name (``None``: not given)."""
    import attrs

    from mmkit import TrainConfig, parse_assignments
    from mmkit import config_field_type as base_type

    out: dict[str, Any] = {}
    for field in attrs.fields(TrainConfig):
        value = options.get(field.name)
        if value is None:
            continue
        tp, _ = base_type(field.type)
        if typing.get_origin(tp) is dict:
            value = _keyed(value, _flag_name(field))
        elif field.name == "modalities":
            value = _split(value)  # --modalities a,b or --modalities a --modalities b
        out[field.name] = value
    out.update(parse_assignments(options.get("set_")))
    return out


def _train(options: dict[str, Any]) -> None:
    from mmkit import ConfigError

    try:
        from mmkit import preflight, resolve_config

        cfg = resolve_config(options.get("config"), overrides_from(options))
        # Every check that needs no model, before torch and the LLM load (and before anything is written).
        preflight(cfg)
        if options.get("dry_run"):
            from mmkit import dry_run
            from mmkit import print_dry_run as print_report

            print_report(dry_run(cfg), as_json=bool(options.get("json_")))
            return
        if cfg.num_procs > 1:
            from mmkit import launch, launched_externally

            if not launched_externally():  # else: deepspeed / torchrun / our launcher already started the group
                code = launch(cfg)
                if code:
                    raise typer.Exit(code)
                return
        from mmkit import train as run

        run(cfg)
    except ConfigError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(CONFIG_ERROR_EXIT) from None

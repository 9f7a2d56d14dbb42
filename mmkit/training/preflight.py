"""Every check of a training configuration that needs no model, run before anything loads.

Types and ranges are checked when a :class:`~mmkit.training.config.TrainConfig` is built; this adds
what needs the file system and the plugin host: modalities, encoders, projectors and readers
installed, input files present and recognised by a reader, the template resolvable, the output
directory writable, the batch geometry possible. All problems are reported at once
(:class:`~mmkit.training.config.ConfigProblems`), so a bad configuration fails in a fraction of a
second instead of after the LLM has loaded.

Nothing here writes: a refused run must leave its output directory as it was.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
from pathlib import Path
from typing import Any

from mmkit.errors import ConfigError, DataError, MmkitError
from mmkit.training.config import ConfigProblems, TrainConfig

Problems = list[tuple[str, str]]


def preflight(cfg: TrainConfig, host: Any = None, *, world_size: int | None = None) -> None:
    """Raise :class:`ConfigProblems` listing every problem found; return quietly otherwise.
    ``world_size``: the number of training processes (default: ``WORLD_SIZE`` when launched,
    else ``cfg.num_procs``)."""
    if host is None:
        from mmkit.plugins import get_host

        host = get_host()
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE") or cfg.num_procs)
    problems: Problems = []
    unreadable: list[DataError] = []  # files a reader refuses: data errors, as the recipe reports them
    selected = _modalities(cfg, host, problems)
    _components(cfg, host, selected, problems)
    _llm(cfg, problems)
    _data(cfg, host, problems, unreadable)
    _paths(cfg, problems)
    _template(cfg, problems)
    _geometry(cfg, world_size, problems)
    if problems:
        raise ConfigProblems(problems + [("data", f"data: {exc}") for exc in unreadable])
    if unreadable:
        first = unreadable[0]
        if len(unreadable) > 1:
            others = ", ".join(exc.source for exc in unreadable[1:])
            raise DataError(first.source, first.record, f"{first.reason} (and in {others})", kind=first.kind)
        raise first


def _hint(value: str, known: list[str]) -> str:
    close = difflib.get_close_matches(value, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _modalities(cfg: TrainConfig, host: Any, problems: Problems) -> tuple[str, ...]:
    installed = sorted(host.modalities())
    for name in cfg.modalities:
        if name not in installed:
            problems.append(("modalities", f"modalities: {name!r} is not installed (installed: "
                             f"{', '.join(installed) or 'none'}){_hint(name, installed)}"))
    if cfg.modalities:
        return tuple(m for m in cfg.modalities if m in installed)
    with_demo = tuple(name for name, spec in host.modalities().items() if spec.demo is not None)
    if not with_demo:
        problems.append(("modalities", "modalities: none given and no installed modality has a demo; name them "
                         f"with --modalities (installed: {', '.join(installed) or 'none'})"))
    return with_demo


def _components(cfg: TrainConfig, host: Any, selected: tuple[str, ...], problems: Problems) -> None:
    """Per-modality settings name installed modalities, and existing encoders and projectors."""
    installed = sorted(host.modalities())
    for field in ("encoders", "encoder_pretrained", "encoder_options", "projectors", "projector_options"):
        for modality in getattr(cfg, field):
            if modality not in installed:
                problems.append((field, f"{field}.{modality}: {modality!r} is not an installed modality (installed: "
                                 f"{', '.join(installed) or 'none'}){_hint(modality, installed)}"))
    encoders = host.encoders()
    for modality, name in cfg.encoders.items():
        spec = encoders.get(name)
        if spec is None:
            problems.append(("encoders", f"encoders.{modality}: no encoder named {name!r} (registered: "
                             f"{', '.join(sorted(encoders)) or 'none'}){_hint(name, sorted(encoders))}"))
        elif modality in installed and spec.modality != modality:
            problems.append(("encoders", f"encoders.{modality}: {name!r} encodes {spec.modality}, not {modality}"))
    projectors = host.projectors()
    for modality, name in cfg.projectors.items():
        if name not in projectors:
            problems.append(("projectors", f"projectors.{modality}: no projector named {name!r} (registered: "
                             f"{', '.join(sorted(projectors)) or 'none'}){_hint(name, sorted(projectors))}"))


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text


def _llm(cfg: TrainConfig, problems: Problems) -> None:
    if cfg.llm is None:
        return
    path = Path(cfg.llm).expanduser()
    if path.exists():
        if not path.is_dir():
            problems.append(("llm", f"llm {cfg.llm}: not a directory (give a model directory or a hub id)"))
        elif not (path / "config.json").is_file():
            problems.append(("llm", f"llm {cfg.llm}: no config.json in that directory (not a saved model)"))
        else:
            for name in ("config.json", "tokenizer_config.json", "tokenizer.json"):
                problem = _json_problem(path / name)
                if problem:
                    problems.append(("llm", f"llm {cfg.llm}: {name} {problem}"))
    elif _looks_like_path(cfg.llm):  # a hub id is NAME or ORG/NAME
        problems.append(("llm", f"llm {cfg.llm}: no such directory"))


def _json_problem(path: Path) -> str | None:
    """Why a model directory's JSON file would make loading fail with a raw traceback, or ``None``."""
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except UnicodeDecodeError as exc:
        return f"is not UTF-8 text ({exc.reason} at byte {exc.start})"
    except json.JSONDecodeError as exc:
        return f"is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})"
    except (OSError, RecursionError) as exc:
        return f"cannot be read ({type(exc).__name__}: {exc})"
    return None if isinstance(value, dict) else f"is not a JSON object (a {type(value).__name__})"


def _data(cfg: TrainConfig, host: Any, problems: Problems, unreadable: list[DataError]) -> None:
    from mmkit.data.sources import DataSource, pick_reader

    readers = sorted(host.readers())
    reader = cfg.data_format
    if reader is not None and reader not in readers:
        problems.append(("data_format", f"data_format {reader!r}: no such reader (registered: "
                         f"{', '.join(readers) or 'none'}){_hint(reader, readers)}"))
        reader = "unknown"
    for field in ("data", "eval_data"):
        for entry in getattr(cfg, field):
            path = DataSource.parse(entry).path if field == "data" else Path(entry)
            problem = _readable(path)
            if problem is None and reader != "unknown" and path.is_file():
                try:  # the reader's detection reads the file's first records (at most its first MiB)
                    pick_reader(host, path, reader)
                except DataError as exc:
                    unreadable.append(exc)
                except (OSError, ValueError, RecursionError) as exc:
                    problem = f"{path}: cannot be read ({type(exc).__name__}: {exc})"
                except MmkitError as exc:
                    problem = str(exc)
            if problem is not None:
                problems.append((field, f"{field}: {problem}"))


def _readable(path: Path) -> str | None:
    if not path.exists():
        return f"{path}: file not found"
    if path.is_file() and not os.access(path, os.R_OK):
        return f"{path}: not readable (permissions)"
    return None


def _paths(cfg: TrainConfig, problems: Problems) -> None:
    if cfg.data_root is not None and not Path(cfg.data_root).expanduser().is_dir():
        problems.append(("data_root", f"data_root {cfg.data_root}: no such directory"))
    if cfg.init_from is not None and not Path(cfg.init_from).expanduser().is_dir():
        problems.append(("init_from", f"init_from {cfg.init_from}: no such run directory"))
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).expanduser().exists():
        problems.append(("resume", f"resume {cfg.resume!r}: use auto, never, or an existing checkpoint or run "
                         "directory (no such path)"))
    for field in ("output_dir", "cache_features"):
        value = getattr(cfg, field)
        if value is not None and not (field == "cache_features" and value == "auto"):  # auto: inside output_dir
            problem = writable_dir_problem(Path(value).expanduser())
            if problem:
                problems.append((field, f"{field} {value}: {problem}"))


def writable_dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used (or created) as a writable directory, or ``None``; writes nothing."""
    if path.exists():
        if not path.is_dir():
            return "exists and is not a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return "the directory is not writable"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be created: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent} is not writable"
    return None


# -- template -------------------------------------------------------------------------------------
_TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2", ".tmpl", ".txt")


def _template(cfg: TrainConfig, problems: Problems) -> None:
    library = _template_library()
    check_early = getattr(library, "check_early", None)
    if check_early is not None:
        # the library's own rule: a name, a Jinja file or text; unset: the local tokenizer must have one
        try:
            check_early(cfg.llm, cfg.template)
        except ConfigError as exc:
            problems.append(("template", str(exc)))
        return
    problem = template_problem(cfg.template)
    if problem:
        problems.append(("template", f"template {cfg.template!r}: {problem}"))


def _template_library() -> Any:
    """mmkit's template library module, or ``None`` in an install without one."""
    try:
        return importlib.import_module("mmkit.templates")
    except ModuleNotFoundError as exc:
        if exc.name in ("mmkit.templates", "mmkit"):
            return None
        raise


def template_problem(template: str | None) -> str | None:
    """A template is a library name or a Jinja file; ``None`` when it resolves (or cannot be
    judged without a tokenizer)."""
    if template is None:
        return None
    path = Path(template).expanduser()
    if path.exists() or path.suffix in _TEMPLATE_SUFFIXES or "/" in template or os.sep in template:
        if not path.is_file():
            return "no such template file"
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return f"cannot be read ({exc})"
        try:
            import jinja2
        except ImportError:  # transformers needs jinja2 to render any chat template
            return None
        try:
            jinja2.Environment().parse(text)
        except jinja2.TemplateSyntaxError as exc:
            return f"not a valid Jinja template (line {exc.lineno}: {exc.message})"
        return None
    names = library_template_names()
    if names is None or template in names:
        return None
    return (f"not a template name (known: {', '.join(sorted(names))}) nor a file"
            f"{_hint(template, sorted(names))}")


def library_template_names() -> list[str] | None:
    """The names in mmkit's template library, or ``None`` when this install has none."""
    library = _template_library()
    names = getattr(library, "names", None)
    return sorted(names()) if callable(names) else None


def _geometry(cfg: TrainConfig, world_size: int, problems: Problems) -> None:
    from mmkit.data.sampler import batch_geometry

    try:
        batch_geometry(micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum,
                       global_batch_size=cfg.global_batch_size, world_size=world_size)
    except ConfigError as exc:
        problems.append(("global_batch_size", str(exc)))

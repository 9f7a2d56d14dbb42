"""Export a trained run to formats other tools load: ``mmkit export RUN --to FORMAT OUT``.

Formats come from the ``mmkit_exporters`` hook (:class:`mmkit.specs.ExporterSpec`): mmkit registers
``peft`` and ``merged``; a modality plugin adds the format its community uses (the vision plugin's
``llava-hf``). Importing this package is cheap (no torch); :func:`export_run` imports what it needs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmkit.errors import ConfigError, MmkitError

__all__ = ["ExportRefused", "export_run"]


class ExportRefused(MmkitError):
    """The format cannot hold this run exactly (a piece it has no place for); the message says why."""


def export_run(run: str | os.PathLike[str], fmt: str, out: str | os.PathLike[str], *, adapter: str | None = None,
               overwrite: bool = False, host: Any = None, **options: Any) -> dict[str, int]:
    """Export the run (its output directory or ``model/`` folder) to ``out`` in format ``fmt``.

    The format is checked against the run's metadata before the model is loaded, and written into a
    temporary directory that replaces ``out`` only when complete. Returns ``{relative path: bytes}``
    of the files written.
    """
    from mmkit.modeling.persistence import model_dir, read_meta
    from mmkit.plugins import get_host
    from mmkit.specs import resolve

    host = host or get_host()
    spec = host.exporter(fmt)  # PluginError naming the registered formats
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out}: already exists and is not empty; choose another folder or pass --overwrite")
    meta = read_meta(model_dir(Path(run)))
    if spec.check is not None:
        reason = resolve(spec.check)(meta)
        if reason:
            raise ExportRefused(f"{run}: the {fmt} format cannot hold this run: {reason}")

    from mmkit.inference import load
    from mmkit.atomic import atomic_directory

    model = load(run, host=host)
    export = resolve(spec.export)

    def fill(tmp: Path) -> None:
        try:
            export(model, tmp, adapter=adapter, **options)
        except ExportRefused as exc:
            raise ExportRefused(f"{run}: the {fmt} format cannot hold this run: {exc}") from None
        _group_readable(tmp)

    atomic_directory(out, fill)
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}


def _group_readable(root: Path) -> None:
    """Give the export the permissions of any other output under the user's umask: the temporary
    directory it is built in is created private (0700), and plugins may write files privately."""
    from mmkit.atomic import default_mode

    root.chmod(default_mode(directory=True))
    for path in root.rglob("*"):
        path.chmod(default_mode(directory=path.is_dir()))

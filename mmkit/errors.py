"""Errors mmkit reports to users: each names what failed and where, so the CLI can print it
without a traceback."""

from __future__ import annotations

from pathlib import Path


class MmkitError(Exception):
    """Base class: a problem the user can act on. The CLI prints ``str(err)`` and exits 1."""


class InputError(MmkitError):
    """A raw input could not be used. ``InputError(reason)`` where the path is not known (a
    plugin's ``preprocess`` never sees one: mmkit adds the file, record and plugin), or
    ``InputError(path, reason)``."""

    def __init__(self, path_or_reason: str | Path, reason: str | None = None):
        path = None if reason is None else path_or_reason
        self.path = None if path is None else str(path)
        self.reason = str(path_or_reason) if reason is None else reason
        super().__init__(self.reason if self.path is None else f"{self.path}: {self.reason}")

    def __reduce__(self):  # picklable across data-loader processes, path kept apart from the reason
        return (InputError, (self.reason,) if self.path is None else (self.path, self.reason))


class PluginError(MmkitError):
    """A plugin failed to load, registered badly, or clashes with another plugin."""


class DataError(MmkitError):
    """A dataset record is malformed; names the file and the record (its index, and its ``id`` when
    known). ``kind`` is a short category for reports (``schema``, ``turn_order``, ``placeholder``,
    ``path``, ``missing_file``, ``corrupt_file``, ``too_long``, ``file_format``, ...)."""

    def __init__(self, source: str, record: str | int | None, reason: str, *, record_id: str | None = None,
                 kind: str | None = None):
        self.source = source
        self.record = record
        self.reason = reason
        self.record_id = record_id
        self.kind = kind
        where = source if record is None else f"{source} record {record}"
        if record_id is not None:
            where += f" (id {record_id})"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # picklable across processes, keyword fields included
        return (_rebuild_data_error, (self.source, self.record, self.reason, self.record_id, self.kind))


def _rebuild_data_error(source, record, reason, record_id, kind) -> DataError:
    return DataError(source, record, reason, record_id=record_id, kind=kind)


class ConfigError(MmkitError):
    """A configuration value is missing, unknown or inconsistent."""


class CheckpointMismatchError(MmkitError):
    """A checkpoint does not fit the model it is loaded into (base model, modalities or shapes)."""

"""Errors mmkit reports to users: each names what failed and where, so the CLI can print it
without a traceback."""

from __future__ import annotations

from pathlib import Path


class MmkitError(Exception):
    """Base class: a problem the user can act on. The CLI prints ``str(err)`` and exits 1."""


class InputError(MmkitError):
    """A raw input file (image, point cloud, audio, ...) could not be used."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class PluginError(MmkitError):
    """A plugin failed to load, registered badly, or clashes with another plugin."""


class DataError(MmkitError):
    """A dataset record is malformed; names the file and the record."""

    def __init__(self, source: str, record: str | int | None, reason: str):
        self.source = source
        self.record = record
        self.reason = reason
        where = source if record is None else f"{source} record {record}"
        super().__init__(f"{where}: {reason}")


class ConfigError(MmkitError):
    """A configuration value is missing, unknown or inconsistent."""


class CheckpointMismatchError(MmkitError):
    """A checkpoint does not fit the model it is loaded into (base model, modalities or shapes)."""

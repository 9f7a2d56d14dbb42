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
        return (type(self), (self.path, self.reason))  # InputError(None, reason): no path


class MissingInputError(InputError):
    """The raw input file does not exist (``InputError(path, "file not found")`` as a type)."""

    def __init__(self, path_or_reason: str | Path, reason: str | None = "file not found"):
        super().__init__(path_or_reason, reason)


class PluginError(MmkitError):
    """A plugin failed to load, registered badly, or clashes with another plugin."""


class PluginLoadError(PluginError):
    """A plugin could not be imported or registered, or one of its registration hooks failed
    (raised for in-process and default plugins, and for every plugin under
    ``MMKIT_PLUGINS_STRICT=1``; otherwise recorded and shown by ``mmkit plugins list``)."""


class NotRegisteredError(PluginError, LookupError):
    """No installed plugin registered a modality / encoder / projector / ... of that name."""


class DataError(MmkitError):
    """A dataset record is malformed; names the file and the record (its index, and its ``id`` when
    known). ``kind`` is a short category for reports (``schema``, ``turn_order``, ``placeholder``,
    ``path``, ``missing_file``, ``corrupt_file``, ``too_long``, ``file_format``, ...).

    The kinds callers act on are also types: ``DataError(..., kind="missing_file")`` builds a
    :class:`MissingFileError` (so code that copies ``kind=exc.kind`` onto a new error keeps the
    type), and ``MissingFileError(source, record, reason)`` has ``kind == "missing_file"``."""

    #: the kind an instance of this class has when none is given
    default_kind: str | None = None

    def __new__(cls, *args, kind: str | None = None, **kwargs):
        if cls is DataError and kind in _BY_KIND:
            cls = _BY_KIND[kind]
        return super().__new__(cls, *args)

    def __init__(self, source: str, record: str | int | None, reason: str, *, record_id: str | None = None,
                 kind: str | None = None):
        self.source = source
        self.record = record
        self.reason = reason
        self.record_id = record_id
        self.kind = kind if kind is not None else self.default_kind
        where = source if record is None else f"{source} record {record}"
        if record_id is not None:
            where += f" (id {record_id})"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # picklable across processes, keyword fields (and so the type) included
        return (_rebuild_data_error, (self.source, self.record, self.reason, self.record_id, self.kind))


class MissingFileError(DataError):
    """A data file or an input file a record names does not exist (kind ``missing_file``)."""

    default_kind = "missing_file"


class CorruptFileError(DataError):
    """An input file exists but cannot be decoded or preprocessed (kind ``corrupt_file``)."""

    default_kind = "corrupt_file"


class RecordSchemaError(DataError):
    """A record does not have the shape of a conversation record (kind ``schema``)."""

    default_kind = "schema"


#: kind -> the DataError subclass that kind builds
_BY_KIND: dict[str, type[DataError]] = {cls.default_kind: cls for cls in (MissingFileError, CorruptFileError,
                                                                          RecordSchemaError)}


def _rebuild_data_error(source, record, reason, record_id, kind) -> DataError:
    return DataError(source, record, reason, record_id=record_id, kind=kind)


class ConfigError(MmkitError):
    """A configuration value is missing, unknown or inconsistent."""


class CheckpointMismatchError(MmkitError):
    """A checkpoint does not fit the model it is loaded into (base model, modalities or shapes)."""

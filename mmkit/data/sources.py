"""Find the reader for each data file and read samples, with weighted mixtures."""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from mmkit.data.readers import head_records
from mmkit.records import ReadContext, Sample
from mmkit.errors import ConfigError, DataError
from mmkit.plugins import PluginHost
from mmkit.specs import resolve


@attrs.frozen
class DataSource:
    path: Path
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> DataSource:
        """``file.json`` or ``file.json:0.5`` (a mixture weight: the share of the file's records used
        per epoch; above 1 repeats records)."""
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                return cls(Path(head), float(tail))
            except ValueError:
                pass
        return cls(Path(text))


GENERIC_READER = "generic"
#: Records a reader's ``detect`` must accept for the reader to be chosen.
DETECT_RECORDS = 32


def pick_reader(host: PluginHost, path: Path, name: str | None) -> str:
    if name is not None:
        host.reader(name)
        return name
    # The generic reader accepts any record with conversations, so it is asked last: the readers
    # that recognise a specific format (LAMM's task_type, LLaVA's keys) get their files first.
    ordered = [(name, resolve(spec.detect)) for name, spec in
               sorted(host.readers().items(), key=lambda item: item[0] == GENERIC_READER) if spec.detect is not None]
    # The path first (record None): readers of non-JSON data (parquet, dataset directories) know
    # their files by path, and the JSON sniffing below cannot read those.
    for reader_name, detect in ordered:
        try:
            if detect(path, None):
                return reader_name
        except Exception:  # a detect written for records only
            continue
    # Several leading records, not just the first: a mixed file that opens with an image record is
    # not a LLaVA file when a point-cloud record follows.
    head = head_records(path, DETECT_RECORDS)
    # Records no reader accepts (malformed ones) are left to the reader to report.
    votes = [[_claims(detect, path, record) for _, detect in ordered] for record in head]
    usable = [v for v in votes if any(v)]
    if not head and GENERIC_READER in host.readers():
        return GENERIC_READER  # empty, or nothing readable at its start: the reader names what is wrong
    for column, (reader_name, _) in enumerate(ordered):
        if usable and all(v[column] for v in usable):
            return reader_name
    raise DataError(str(path), None, "no reader recognises this file; pass --data-format "
                                     f"({', '.join(host.readers())})")


def _claims(detect: Any, path: Path, record: Any) -> bool:
    """Whether a reader's ``detect`` accepts ``record``; one that raises on it (a plugin's detect
    written for its own format only) does not, as for the path above."""
    try:
        return bool(detect(path, record))
    except Exception:
        return False


def iter_samples(host: PluginHost, path: Path, ctx: ReadContext, reader: str | None = None) -> Iterator[Sample]:
    try:
        name = pick_reader(host, path, reader)
        yield from resolve(host.reader(name).read)(path, context=ctx)
    except RecursionError:  # any reader (a plugin's too) on deeply nested JSON: the file, not a traceback
        raise DataError(str(path), None, "nested too deeply to read (over ~1000 levels of lists/objects)",
                        kind="file_format") from None
    except FileNotFoundError as exc:  # the data file (or one a reader opens): named, not a traceback
        raise DataError(str(path), None, f"file not found: {exc.filename or path}", kind="missing_file") from None


def ignored_key_reason(key: str, installed: Mapping[str, Any], selected: Collection[str]) -> str:
    """Why a record's key ``key`` carries nothing into training (``installed``: every installed
    modality's spec by name; ``selected``: the modalities of this run)."""
    owner = next((name for name, spec in installed.items() if key in spec.data_keys), None)
    if owner is not None and owner not in selected:
        return (f"key {key!r} holds {owner} input, but {owner} is not among the selected modalities "
                f"({', '.join(selected) or 'none'}): add it to --modalities or remove the key")
    if owner is not None:
        return f"key {key!r} ({owner} input) is not part of this file's format: use --data-format generic"
    return (f"unknown key {key!r}: not a field of the format nor a data key of any installed modality "
            f"(installed: {', '.join(sorted(installed)) or 'none'})")


def read_mixture(host: PluginHost, sources: Sequence[DataSource], ctx: ReadContext, *, reader: str | None = None,
                 seed: int = 0) -> list[Sample]:
    """All samples of a weighted mixture: each file contributes ``weight x its size`` records."""
    rng = random.Random(seed)
    out: list[Sample] = []
    for source in sources:
        # divmod(-0.3, 1.0) is (-1, 0.7): a bad weight would silently become another share
        if not (math.isfinite(source.weight) and source.weight > 0):
            raise ConfigError(f"data {source.path}: mixture weight {source.weight} is not a finite number > 0")
        samples = list(iter_samples(host, source.path, ctx, reader))
        if not samples:
            raise DataError(str(source.path), None, "no records")
        whole, frac = divmod(source.weight, 1.0)
        picked = samples * int(whole) + rng.sample(samples, round(frac * len(samples)))
        if not picked:  # never leave a file out of the mixture without saying so
            raise DataError(str(source.path), None, f"weight {source.weight} x {len(samples)} records rounds to no "
                                                    "record: raise the weight or leave the file out")
        out.extend(picked)
    return out

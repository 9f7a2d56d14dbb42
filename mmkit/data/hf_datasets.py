"""A reader over Hugging Face ``datasets``: parquet and arrow files, local dataset directories
(``save_to_disk`` output, or a folder of data files), and ``hf:NAME[:SPLIT]`` names when the hub is
reachable. Rows stream one at a time (``streaming=True``; a saved dataset is memory-mapped), and
each row is read like a JSON record (``conversations`` or ``messages``, modality keys holding
paths). ``datasets`` is an optional extra (``pip install 'mmkit-sdk[datasets]'``).

Modality inputs must be file paths: an input embedded in the table (bytes, a decoded object) is
reported as a bad record, since mmkit's modality loaders read files.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmkit.records import ReadContext, Sample
from mmkit.errors import ConfigError, DataError

SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}
HUB_PREFIX = "hf:"


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()
                              or (path / "dataset_dict.json").is_file())


def _data_dir(path: Path) -> bool:
    return path.is_dir() and any(p.suffix in SUFFIXES for p in path.iterdir())


def detect_hf_dataset(path: Path, first_record: Any) -> bool:
    """By path alone: a parquet / arrow file, a dataset directory, or an ``hf:`` name."""
    text = str(path)
    if text.startswith(HUB_PREFIX):
        return True
    path = Path(path)
    return path.suffix in SUFFIXES or _is_saved_dataset(path) or _data_dir(path)


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{path}: reading parquet / arrow / dataset directories needs the 'datasets' package "
                          "(pip install datasets)") from None
    datasets.disable_progress_bars()
    text = str(path)
    if text.startswith(HUB_PREFIX):
        name, _, split = text[len(HUB_PREFIX):].partition(":")
        ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    elif _is_saved_dataset(path):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(str(path), None, f"a dataset dict without a 'train' split ({', '.join(ds)})",
                                kind="file_format")
            ds = ds["train"]
        ds = ds.to_iterable_dataset()
    elif path.is_dir():
        ds = datasets.load_dataset(str(path), split="train", streaming=True)
    elif path.is_file() and path.suffix == ".parquet":
        # row groups straight from pyarrow: streamed, and without the dataset builder's set-up time
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    elif path.is_file():
        ds = datasets.Dataset.from_file(str(path)).to_iterable_dataset()  # memory-mapped arrow
    else:
        raise DataError(str(path), None, "file not found", kind="missing_file")
    # inputs are read by the modalities' loaders from files: keep encoded columns as they are stored
    try:
        ds = ds.decode(False)
    except (AttributeError, TypeError, ValueError):
        pass
    yield from ds


def _as_paths(row: dict[str, Any], ctx: ReadContext) -> dict[str, Any]:
    """Input columns as paths: ``{"path": ..., "bytes": ...}`` cells (datasets' media features) give
    their path; an embedded input without one is an error naming the column."""
    out = dict(row)
    for key, value in row.items():
        if ctx.modality_for_key(key) is None:
            continue
        values = value if isinstance(value, list) else [value]
        paths = []
        for v in values:
            if isinstance(v, dict) and isinstance(v.get("path"), str) and v["path"]:
                paths.append(v["path"])
            elif isinstance(v, str) or v is None:
                paths.append(v)
            else:
                raise ValueError(f"column {key!r} holds an embedded input ({type(v).__name__}); mmkit reads "
                                 "inputs from files: store paths in the table")
        out[key] = paths if isinstance(value, list) else paths[0]
        if out[key] is None:
            del out[key]
    return out


def read_hf_dataset(path: Path, *, context: ReadContext) -> Iterator[Sample]:
    from mmkit.data.readers import parse_records

    path = Path(path) if not str(path).startswith(HUB_PREFIX) else path
    source = str(path)
    base = Path(path).parent if Path(path).is_file() else Path(path)

    def records() -> Iterator[tuple[int, Any]]:
        for index, row in enumerate(_rows(Path(path))):
            try:
                yield index, _as_paths(row, context)
            except ValueError as exc:
                error = DataError(source, index, str(exc), kind="schema")
                if context.on_bad_record is None:
                    raise error from None
                context.on_bad_record(error)

    yield from parse_records(records(), context, source=source, base=base)

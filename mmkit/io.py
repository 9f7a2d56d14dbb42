"""Safe array files for a modality's ``load``: ``.npy`` (never unpickled), ``.npz``, ``.csv`` /
``.tsv`` / ``.txt`` (delimiter and header sniffed), with size, dtype and finite checks.

Every problem is an :class:`mmkit.InputError` naming the file and the reason. numpy and the standard
library only (no torch): ``load`` runs in data-loader workers and in ``mmkit data validate``.

    from mmkit.io import load_array
    signal = load_array(path, max_elements=10_000_000)   # float32, finite, real numbers
"""

from __future__ import annotations

import csv
import io
import os
import zipfile
from pathlib import Path

import numpy as np

from mmkit.errors import InputError, MissingInputError

ARRAY_TYPES = (".npy", ".npz", ".csv", ".tsv", ".txt")
#: Default guard against loading a huge array by mistake (1 GiB of float32).
MAX_ELEMENTS = 1 << 28
#: Text files larger than this are refused before parsing (parsing text costs ~50x its size in memory).
MAX_TEXT_BYTES = 256 << 20
_DELIMITERS = ",\t; "


def load_array(path: str | Path, *, dtype: str | np.dtype = "float32", max_elements: int = MAX_ELEMENTS,
               allow_nonfinite: bool = False, key: str | None = None) -> np.ndarray:
    """One numeric array from ``path`` (by suffix: ``.npy``, ``.npz``, ``.csv``, ``.tsv``, ``.txt``),
    converted to ``dtype``. ``key`` picks the array of an ``.npz`` holding several. Raises
    :class:`InputError` for a missing, unreadable, non-numeric, oversized or non-finite array."""
    array = read_array(path, max_elements=max_elements, key=key)
    return finish(path, array, dtype=dtype, allow_nonfinite=allow_nonfinite)


def read_array(path: str | Path, *, max_elements: int = MAX_ELEMENTS, key: str | None = None,
               text: bool | None = None) -> np.ndarray:
    """The array of ``path`` in its stored dtype (no conversion, no finite check: see :func:`finish`),
    for loaders that interpret the dtype (e.g. integer colours). ``text=True`` reads any suffix as a
    delimited text table (``.xyz``, ``.dat``, ...)."""
    path = Path(path)
    check_file(path)
    suffix = path.suffix.lower()
    if text or (text is None and suffix in (".csv", ".tsv", ".txt")):
        return _read_text(path, max_elements, delimiter="\t" if suffix == ".tsv" else None)
    if suffix == ".npy":
        return _read_npy(path, max_elements)
    if suffix == ".npz":
        return _read_npz(path, max_elements, key)
    raise InputError(path, f"unsupported file type {suffix or '(none)'!r}; expected one of {' '.join(ARRAY_TYPES)}")


def save_array(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` in the format :func:`load_array` reads back (by suffix; ``.npy`` never pickles)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        np.save(path, array, allow_pickle=False)
    elif suffix == ".npz":
        np.savez(path, array=array)
    elif suffix in (".csv", ".tsv", ".txt"):
        np.savetxt(path, array if array.ndim else array.reshape(1), delimiter="\t" if suffix == ".tsv" else ",",
                   fmt="%.9g")
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; expected one of {' '.join(ARRAY_TYPES)}")
    return path


def check_file(path: Path) -> None:
    """A regular, non-empty file, or an :class:`InputError` saying which it is not."""
    if not path.exists():
        raise MissingInputError(path)
    if not path.is_file():
        raise InputError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file")


def check_size(path: str | Path, shape: tuple[int, ...], max_elements: int) -> None:
    """Refuse an array of more than ``max_elements`` values (checked before it is read)."""
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count == 0:
        raise InputError(path, f"the array is empty (shape {tuple(shape)})")
    if count > max_elements:
        raise InputError(path, f"the array has {count:,} values (shape {tuple(shape)}); the limit is {max_elements:,}")


def check_finite(path: str | Path, array: np.ndarray) -> None:
    """Refuse NaN or infinite values, naming how many and where the first is."""
    bad = ~np.isfinite(array)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(path, f"{int(bad.sum())} NaN or infinite value(s) (first at index {first if len(first) > 1 else first[0]})")


def finish(path: str | Path, array: np.ndarray, *, dtype: str | np.dtype = "float32",
           allow_nonfinite: bool = False) -> np.ndarray:
    """Real-number check, conversion to ``dtype`` (refusing overflow) and the finite check."""
    if array.dtype.kind not in "iuf":
        raise InputError(path, f"expected real numbers, got dtype {array.dtype}")
    out = array.astype(dtype)
    if not allow_nonfinite:
        if array.dtype.kind == "f" and np.isfinite(array).all() and not np.isfinite(out).all():
            raise InputError(path, f"values overflow {np.dtype(dtype).name}")
        check_finite(path, out)
    return np.ascontiguousarray(out)


# -- readers ------------------------------------------------------------------------------------------
def _npy_header(path: Path, f: io.BufferedIOBase | zipfile.ZipExtFile) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
    except ValueError:
        raise InputError(path, "not a .npy array (bad magic bytes)") from None
    try:
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _fortran, dtype = reader(f)
    except ValueError as exc:
        raise InputError(path, f"corrupt .npy header: {exc}") from None
    if dtype.hasobject:
        raise InputError(path, "the array holds Python objects (refusing to unpickle); store numbers")
    if dtype.names is not None or dtype.kind not in "iuf":
        raise InputError(path, f"expected real numbers, got dtype {dtype}")
    return tuple(shape), dtype


def _read_npy(path: Path, max_elements: int) -> np.ndarray:
    with path.open("rb") as f:
        shape, dtype = _npy_header(path, f)
        check_size(path, shape, max_elements)
        need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if path.stat().st_size - f.tell() < need:  # a lying header must not make us allocate terabytes
            raise InputError(path, f"truncated .npy file: the header declares {need:,} bytes of data")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(path, f"not a readable .npy array: {exc}") from None


def _read_npz(path: Path, max_elements: int, key: str | None) -> np.ndarray:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(path, f"not a readable .npz archive: {exc}") from None
    with archive:
        names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
        if not names:
            raise InputError(path, "the .npz archive holds no arrays")
        if key is None and len(names) > 1:
            raise InputError(path, f"the .npz archive holds {len(names)} arrays ({', '.join(names[:8])}); "
                                   "the loader must name one")
        name = key if key is not None else names[0]
        if name not in names:
            raise InputError(path, f"the .npz archive has no array {name!r} (it has {', '.join(names[:8])})")
        try:
            with archive.open(name + ".npy") as member:
                shape, dtype = _npy_header(path, member)
            check_size(path, shape, max_elements)
            with archive.open(name + ".npy") as member:
                return np.lib.format.read_array(member, allow_pickle=False)
        except InputError:
            raise
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise InputError(path, f"array {name!r} of the .npz archive is unreadable: {exc}") from None


def _read_text(path: Path, max_elements: int, *, delimiter: str | None) -> np.ndarray:
    if os.path.getsize(path) > MAX_TEXT_BYTES:
        raise InputError(path, f"text file larger than {MAX_TEXT_BYTES >> 20} MiB; store large arrays as .npy")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM from spreadsheet exports is fine
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 text (byte {exc.start}); is it a binary file?") from None
    if "\x00" in text[:4096]:
        raise InputError(path, "binary data in a text file")
    # '#' starts a comment, on its own line or after the values
    lines = [(n, line.split("#", 1)[0]) for n, line in enumerate(text.splitlines(), 1) if line.split("#", 1)[0].strip()]
    if not lines:
        raise InputError(path, "no data rows")
    delimiter = delimiter or _sniff_delimiter(text)
    rows = [_split(line, delimiter) for _, line in lines]
    if rows and not _numeric(rows[0]):  # a header row: column names
        lines, rows = lines[1:], rows[1:]
        if not rows:
            raise InputError(path, "only a header row, no data rows")
    width = len(rows[0])
    check_size(path, (len(rows), width), max_elements)
    values = np.empty((len(rows), width), dtype=np.float64)
    for (number, _), row, out in zip(lines, rows, values, strict=True):
        if len(row) != width:
            raise InputError(path, f"line {number} has {len(row)} columns; the first data row has {width}")
        for col, cell in enumerate(row):
            try:
                out[col] = float(cell)
            except ValueError:
                raise InputError(path, f"line {number}, column {col + 1}: {cell!r} is not a number") from None
    return values[:, 0] if width == 1 else values


def _sniff_delimiter(text: str) -> str:
    sample = "\n".join(line.split("#", 1)[0] for line in text.splitlines()[:50] if line.split("#", 1)[0].strip())
    try:
        return csv.Sniffer().sniff(sample, delimiters=_DELIMITERS).delimiter
    except csv.Error:  # one column, ragged rows or irregular spacing: the first separator seen, else whitespace
        first = sample.splitlines()[0] if sample else ""
        return next((d for d in ",\t;" if d in first), " ")


def _split(line: str, delimiter: str) -> list[str]:
    if delimiter in (" ", "\t"):  # any run of tabs and spaces separates
        return line.split()
    return [cell.strip() for cell in line.strip().split(delimiter)]


def _numeric(cells: list[str]) -> bool:
    try:
        [float(c) for c in cells]
    except ValueError:
        return False
    return True

"""Point-cloud file readers and writers, plain numpy (no pickle, no torch).

``load_point_cloud(path)`` returns a float32 array ``[N, 3]`` (xyz) or ``[N, 6]`` (xyz + rgb in
[0, 1]). Every failure is an :class:`mmkit.errors.InputError` naming the file and the reason.

Formats: ``.npy`` (LAMM: ``N x 3`` or ``N x 6``), ``.ply`` (ascii, binary little/big endian;
vertex ``x y z`` and optional ``red green blue``), ``.pcd`` (ascii and binary DATA; fields
``x y z`` and optional packed ``rgb``/``rgba`` or separate ``r g b``), ``.xyz`` / ``.txt`` (rows of 3
or 6 numbers separated by whitespace or commas; ``#`` comments and one text header line allowed).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mmkit import InputError
from mmkit.io import read_array

FILE_TYPES: tuple[str, ...] = (".npy", ".ply", ".pcd", ".xyz", ".txt")

# PLY scalar type names (both spellings) -> numpy type character.
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_MAX_HEADER_LINES = 512  # a real header is a dozen lines; more means we are reading garbage


def load_point_cloud(path: str | Path) -> np.ndarray:
    """Read and validate one point cloud: float32 ``[N, 3]`` or ``[N, 6]``, colours in [0, 1]."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if not path.is_file():
        raise InputError(path, "not a regular file")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise InputError(path, f"unsupported file type {path.suffix or '(none)'!r}; "
                               f"expected one of {' '.join(FILE_TYPES)}")
    try:
        xyz, rgb = reader(path)
    except InputError:
        raise
    except (OSError, ValueError, EOFError, UnicodeDecodeError, OverflowError) as exc:
        # Anything the parsers did not anticipate still reaches the user as "this file, why".
        raise InputError(path, f"could not read {path.suffix} file: {exc}") from exc
    return _validate(path, xyz, rgb)


def _validate(path: Path, xyz: np.ndarray, rgb: np.ndarray | None) -> np.ndarray:
    if xyz.shape[0] == 0:
        raise InputError(path, "the point cloud is empty (0 points)")
    xyz = xyz.astype(np.float64, copy=False)
    bad = ~np.isfinite(xyz).all(axis=1)
    if bad.any():
        raise InputError(path, f"NaN or infinite coordinates in {int(bad.sum())} of {len(xyz)} points "
                               f"(first at row {int(np.argmax(bad))}); remove them before use")
    if np.abs(xyz).max() > np.finfo(np.float32).max:
        raise InputError(path, "coordinates overflow float32")
    if rgb is None:
        return np.ascontiguousarray(xyz, dtype=np.float32)
    rgb = _normalise_colours(path, rgb)
    return np.ascontiguousarray(np.concatenate([xyz, rgb], axis=1), dtype=np.float32)


def _normalise_colours(path: Path, rgb: np.ndarray) -> np.ndarray:
    """Integer colours are scaled by their type's maximum; float colours above 1 are taken as
    0-255 (LAMM/ScanNet .npy files store either convention)."""
    if np.issubdtype(rgb.dtype, np.integer):
        if np.issubdtype(rgb.dtype, np.signedinteger) and (rgb < 0).any():
            raise InputError(path, "negative colour values")
        # 8-bit values in a wider integer type are still 0-255; genuinely wide ones use the type's range.
        top = 255 if rgb.max(initial=0) <= 255 else np.iinfo(rgb.dtype).max
        return rgb.astype(np.float64) / top
    rgb = rgb.astype(np.float64, copy=False)
    if not np.isfinite(rgb).all():
        raise InputError(path, "colour values contain NaN or infinity")
    if rgb.size and rgb.max() > 1.0:
        rgb = rgb / 255.0
    if rgb.size and (rgb.min() < 0.0 or rgb.max() > 1.0):
        raise InputError(path, "colour values must lie in [0, 1] or [0, 255]")
    return rgb


def _split_columns(path: Path, array: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    if array.ndim != 2 or array.shape[1] not in (3, 6):
        raise InputError(path, f"{what} has shape {tuple(array.shape)}; expected N x 3 (xyz) or N x 6 (xyz + rgb)")
    return array[:, :3], (array[:, 3:] if array.shape[1] == 6 else None)


# -- .npy, .xyz, .txt: mmkit.io (no pickle; sizes checked before reading; delimiters and header sniffed)
def _read_npy(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    return _split_columns(path, read_array(path), "array")


def _read_text(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    return _split_columns(path, read_array(path, text=True), "data")


# -- .ply ---------------------------------------------------------------------------------------------
def _read_header(f: BinaryIO, path: Path, end: bytes, kind: str) -> list[str]:
    lines: list[str] = []
    while True:
        raw = f.readline()
        if not raw:
            raise InputError(path, f"malformed {kind} header: no {end.decode()!r} line")
        if len(lines) >= _MAX_HEADER_LINES or len(raw) > 4096:
            raise InputError(path, f"malformed {kind} header: no {end.decode()!r} line in the first "
                                   f"{_MAX_HEADER_LINES} lines")
        try:
            line = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise InputError(path, f"malformed {kind} header: non-text bytes before {end.decode()!r}") from None
        lines.append(line)
        if line.encode().split()[:1] == [end]:
            return lines


def _read_ply(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    with path.open("rb") as f:
        if f.readline().strip() != b"ply":
            raise InputError(path, "not a PLY file: the first line must be 'ply'")
        header = _read_header(f, path, b"end_header", "PLY")
        body = f.read()
    fmt: str | None = None
    elements: list[tuple[str, int, list[tuple[str, str | None]]]] = []  # name, count, (prop, type|None=list)
    for line in header[:-1]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format" and len(words) == 3:
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3:
            if not words[2].isdigit():
                raise InputError(path, f"malformed PLY header: bad element count in {line!r}")
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements:
            if len(words) == 3 and words[1] in _PLY_TYPES:
                elements[-1][2].append((words[2], _PLY_TYPES[words[1]]))
            elif len(words) == 5 and words[1] == "list":
                elements[-1][2].append((words[4], None))
            else:
                raise InputError(path, f"malformed PLY header: bad property line {line!r}")
        else:
            raise InputError(path, f"malformed PLY header: unexpected line {line!r}")
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise InputError(path, f"malformed PLY header: format {fmt!r} is not ascii, binary_little_endian "
                               "or binary_big_endian")
    index = next((i for i, e in enumerate(elements) if e[0] == "vertex"), None)
    if index is None:
        raise InputError(path, "malformed PLY header: no 'element vertex'")
    _, count, props = elements[index]
    names = [p for p, _ in props]
    if not {"x", "y", "z"} <= set(names):
        raise InputError(path, f"PLY vertex element lacks x, y, z properties (has {', '.join(names) or 'none'})")
    if any(t is None for _, t in props):
        raise InputError(path, "PLY vertex element has list properties; only scalar vertex properties are supported")

    if fmt == "ascii":
        lines = body.decode("ascii", errors="replace").splitlines()
        skip = sum(n for _, n, _ in elements[:index])  # earlier elements: one line per item
        rows = lines[skip:skip + count]
        if len(rows) < count:
            raise InputError(path, f"truncated PLY: header declares {count} vertices, file has {len(rows)} data lines")
        try:
            values = np.array(" ".join(rows).split(), dtype=np.float64)
        except ValueError:
            raise InputError(path, "PLY vertex data contains non-numeric values") from None
        if values.size != count * len(props):
            raise InputError(path, f"PLY vertex lines hold {values.size} values, expected {count} x {len(props)}")
        table = values.reshape(count, len(props))
        columns = {name: table[:, i] for i, name in enumerate(names)}
        types = dict(props)
    else:
        order = "<" if fmt == "binary_little_endian" else ">"
        offset = 0
        for name, n, eprops in elements[:index]:
            if any(t is None for _, t in eprops):
                raise InputError(path, f"binary PLY with list element {name!r} before the vertices is not supported")
            offset += n * np.dtype([(p, order + t) for p, t in eprops]).itemsize  # type: ignore[operator]
        dtype = np.dtype([(p, order + t) for p, t in props])  # type: ignore[operator]
        need = offset + count * dtype.itemsize
        if len(body) < need:
            raise InputError(path, f"truncated PLY: {count} vertices need {need} data bytes, file has {len(body)}")
        table = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
        columns = {name: table[name] for name in names}
        types = dict(props)
    xyz = np.stack([columns[c].astype(np.float64) for c in ("x", "y", "z")], axis=1)
    rgb = None
    if {"red", "green", "blue"} <= set(names):
        rgb = np.stack([columns[c] for c in ("red", "green", "blue")], axis=1)
        if fmt == "ascii" and types["red"] is not None and types["red"][0] in "iu":
            rgb = rgb.astype(np.dtype(types["red"]))  # ascii parsed as float: restore the declared int type
    return xyz, rgb


# -- .pcd ---------------------------------------------------------------------------------------------
def _read_pcd(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    with path.open("rb") as f:
        header = _read_header(f, path, b"DATA", "PCD")
        body = f.read()
    fields: dict[str, list[str]] = {}
    for line in header:
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        fields[words[0].upper()] = words[1:]
    names = fields.get("FIELDS")
    if not names:
        raise InputError(path, "malformed PCD header: no FIELDS line")
    n = len(names)
    sizes = fields.get("SIZE", [])
    types = fields.get("TYPE", [])
    counts = fields.get("COUNT", ["1"] * n)
    if len(sizes) != n or len(types) != n or len(counts) != n:
        raise InputError(path, f"malformed PCD header: FIELDS has {n} entries but SIZE/TYPE/COUNT have "
                               f"{len(sizes)}/{len(types)}/{len(counts)}")
    try:
        points = int(fields.get("POINTS", [""])[0] or int(fields["WIDTH"][0]) * int(fields.get("HEIGHT", ["1"])[0]))
        dtype = np.dtype([(name, "<" + {"F": "f", "I": "i", "U": "u"}[t.upper()] + s, (int(c),) if int(c) > 1 else ())
                          for name, s, t, c in zip(names, sizes, types, counts)])
    except (KeyError, ValueError, TypeError, IndexError):
        raise InputError(path, "malformed PCD header: bad POINTS/WIDTH or SIZE/TYPE/COUNT values") from None
    if not {"x", "y", "z"} <= set(names):
        raise InputError(path, f"PCD lacks x, y, z fields (has {' '.join(names)})")
    mode = fields.get("DATA", [""])[0].lower()
    if mode == "ascii":
        rows = body.decode("ascii", errors="replace").split()
        flat_width = sum(int(c) for c in counts)
        if len(rows) < points * flat_width:
            raise InputError(path, f"truncated PCD: header declares {points} points of {flat_width} values, "
                                   f"found {len(rows)} values")
        try:
            values = np.array(rows[:points * flat_width], dtype=np.float64).reshape(points, flat_width)
        except ValueError:
            raise InputError(path, "PCD ascii DATA contains non-numeric values") from None
        table = np.zeros(points, dtype=dtype)
        col = 0
        for name, c in zip(names, counts):
            width = int(c)
            chunk = values[:, col:col + width]
            if name in ("rgb", "rgba") and dtype[name].kind == "f":
                # PCL writes packed colour floats in ascii as the float whose bits hold 0x00RRGGBB.
                table[name] = chunk.reshape(table[name].shape).astype(np.float32)
            else:
                table[name] = chunk.reshape(table[name].shape)
            col += width
    elif mode == "binary":
        if len(body) < points * dtype.itemsize:
            raise InputError(path, f"truncated PCD: {points} points need {points * dtype.itemsize} bytes, "
                                   f"file has {len(body)}")
        table = np.frombuffer(body, dtype=dtype, count=points)
    elif mode == "binary_compressed":
        raise InputError(path, "PCD DATA binary_compressed (LZF) is not supported; re-save as ascii or binary")
    else:
        raise InputError(path, f"malformed PCD header: DATA {mode or '(missing)'!r} is not ascii or binary")
    xyz = np.stack([table[c].astype(np.float64) for c in ("x", "y", "z")], axis=1)
    rgb = None
    packed = next((c for c in ("rgb", "rgba") if c in names), None)
    if packed is not None:
        bits = np.ascontiguousarray(table[packed]).view(np.uint32) if table[packed].dtype.itemsize == 4 \
            else table[packed].astype(np.uint32)
        rgb = np.stack([(bits >> 16) & 255, (bits >> 8) & 255, bits & 255], axis=1).astype(np.uint8)
    elif {"r", "g", "b"} <= set(names):
        rgb = np.stack([table[c] for c in ("r", "g", "b")], axis=1)
    return xyz, rgb


# -- by suffix ---------------------------------------------------------------------------------------
_READERS: dict[str, Callable[[Path], tuple[np.ndarray, np.ndarray | None]]] = {
    ".npy": _read_npy, ".ply": _read_ply, ".pcd": _read_pcd, ".xyz": _read_text, ".txt": _read_text,
}


# -- writers ------------------------------------------------------------------------------------------
def save_point_cloud(path: str | Path, points: np.ndarray, *, binary: bool = True) -> Path:
    """Write ``[N, 3]`` or ``[N, 6]`` points (colours in [0, 1]) as .npy, .ply, .pcd or .xyz/.txt.

    ``binary`` picks binary_little_endian PLY / binary PCD over ascii. Colours go to PLY/PCD as
    8-bit ``red green blue`` / packed ``rgb``; .npy and text keep them as floats.
    """
    path = Path(path)
    points = np.asarray(points, dtype=np.float32)
    if points.ndim != 2 or points.shape[1] not in (3, 6):
        raise ValueError(f"points must be N x 3 or N x 6, got {points.shape}")
    suffix = path.suffix.lower()
    has_rgb = points.shape[1] == 6
    rgb8 = np.clip(np.rint(points[:, 3:] * 255), 0, 255).astype(np.uint8) if has_rgb else None
    if suffix == ".npy":
        np.save(path, points, allow_pickle=False)
    elif suffix in (".xyz", ".txt"):
        np.savetxt(path, points, fmt="%.7g")
    elif suffix == ".ply":
        fmt = "binary_little_endian" if binary else "ascii"
        props = ["property float x", "property float y", "property float z"]
        if has_rgb:
            props += ["property uchar red", "property uchar green", "property uchar blue"]
        head = "\n".join(["ply", f"format {fmt} 1.0", "comment written by mmkit-plugin-pointcloud",
                          f"element vertex {len(points)}", *props, "end_header"]) + "\n"
        fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")] + ([("red", "u1"), ("green", "u1"), ("blue", "u1")]
                                                               if has_rgb else [])
        table = np.zeros(len(points), dtype=fields)
        for i, c in enumerate("xyz"):
            table[c] = points[:, i]
        if rgb8 is not None:
            for i, c in enumerate(("red", "green", "blue")):
                table[c] = rgb8[:, i]
        with path.open("wb") as f:
            f.write(head.encode("ascii"))
            if binary:
                f.write(table.tobytes())
            else:
                np.savetxt(f, np.array(table.tolist(), dtype=np.float64), fmt="%.7g")
    elif suffix == ".pcd":
        names = "x y z rgb" if has_rgb else "x y z"
        k = 4 if has_rgb else 3
        head = "\n".join(["# .PCD v0.7 - written by mmkit-plugin-pointcloud", "VERSION 0.7", f"FIELDS {names}",
                          "SIZE" + " 4" * k, "TYPE" + " F" * 3 + (" U" if has_rgb else ""), "COUNT" + " 1" * k,
                          f"WIDTH {len(points)}", "HEIGHT 1", "VIEWPOINT 0 0 0 1 0 0 0", f"POINTS {len(points)}",
                          f"DATA {'binary' if binary else 'ascii'}"]) + "\n"
        table = np.zeros(len(points), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
                         + ([("rgb", "<u4")] if has_rgb else []))
        for i, c in enumerate("xyz"):
            table[c] = points[:, i]
        if rgb8 is not None:
            table["rgb"] = (rgb8[:, 0].astype(np.uint32) << 16) | (rgb8[:, 1].astype(np.uint32) << 8) | rgb8[:, 2]
        with path.open("wb") as f:
            f.write(head.encode("ascii"))
            if binary:
                f.write(table.tobytes())
            else:
                for row in table.tolist():
                    f.write((" ".join(f"{v:.7g}" if isinstance(v, float) else str(v) for v in row) + "\n").encode())
    else:
        raise ValueError(f"cannot write {suffix!r}; use one of {' '.join(FILE_TYPES)}")
    return path

"""Readers for each format, colour normalisation, and the writer round trip."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from mmkit.errors import InputError
from mmkit_plugin_pointcloud.io import load_point_cloud, save_point_cloud

XYZ = np.array([[0.0, 1.0, 2.0], [-1.5, 0.25, 3.0], [10.0, -20.0, 0.125], [1e-3, 2e3, -7.0]], dtype=np.float32)
RGB8 = np.array([[255, 0, 0], [0, 128, 255], [12, 34, 56], [255, 255, 255]], dtype=np.uint8)


def _ply_header(fmt: str, n: int, rgb: bool, extra: str = "") -> bytes:
    props = "property float x\nproperty float y\nproperty float z\n"
    if rgb:
        props += "property uchar red\nproperty uchar green\nproperty uchar blue\n"
    return (f"ply\nformat {fmt} 1.0\ncomment test\nelement vertex {n}\n{props}{extra}end_header\n").encode()


def test_npy_xyz_and_xyz_rgb(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", XYZ.astype(np.float64))
    out = load_point_cloud(tmp_path / "a.npy")
    assert out.dtype == np.float32 and out.shape == (4, 3)
    np.testing.assert_array_equal(out, XYZ)

    np.save(tmp_path / "b.npy", np.concatenate([XYZ, RGB8.astype(np.float32)], axis=1))  # 0-255 floats
    out = load_point_cloud(tmp_path / "b.npy")
    assert out.shape == (4, 6)
    np.testing.assert_allclose(out[:, 3:], RGB8 / 255.0, atol=1e-7)

    unit = np.concatenate([XYZ, RGB8 / 255.0], axis=1).astype(np.float32)  # already in [0, 1]: kept
    np.save(tmp_path / "c.npy", unit)
    np.testing.assert_allclose(load_point_cloud(tmp_path / "c.npy"), unit)


def test_npy_integer_coordinates(tmp_path: Path) -> None:
    np.save(tmp_path / "i.npy", np.arange(12, dtype=np.int16).reshape(4, 3))
    np.testing.assert_array_equal(load_point_cloud(tmp_path / "i.npy"), np.arange(12).reshape(4, 3))


@pytest.mark.parametrize("fmt", ["ascii", "binary_little_endian", "binary_big_endian"])
def test_ply_formats_with_colour(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"{fmt}.ply"
    header = _ply_header(fmt, len(XYZ), rgb=True)
    if fmt == "ascii":
        body = "".join(f"{x!r} {y!r} {z!r} {r} {g} {b}\n" for (x, y, z), (r, g, b)
                       in zip(XYZ.tolist(), RGB8.tolist())).encode()
    else:
        order = "<" if fmt == "binary_little_endian" else ">"
        table = np.zeros(len(XYZ), dtype=[("x", order + "f4"), ("y", order + "f4"), ("z", order + "f4"),
                                          ("red", "u1"), ("green", "u1"), ("blue", "u1")])
        for i, c in enumerate("xyz"):
            table[c] = XYZ[:, i]
        for i, c in enumerate(("red", "green", "blue")):
            table[c] = RGB8[:, i]
        body = table.tobytes()
    path.write_bytes(header + body)
    out = load_point_cloud(path)
    np.testing.assert_array_equal(out[:, :3], XYZ)
    np.testing.assert_allclose(out[:, 3:], RGB8 / 255.0, atol=1e-7)


def test_ply_ignores_faces_and_extra_properties(tmp_path: Path) -> None:
    header = (b"ply\nformat ascii 1.0\nelement vertex 3\nproperty double x\nproperty double y\n"
              b"property double z\nproperty float nx\nproperty float ny\nproperty float nz\n"
              b"element face 1\nproperty list uchar int vertex_indices\nend_header\n")
    body = b"0 0 0 0 0 1\n1 0 0 0 0 1\n0 1 0 0 0 1\n3 0 1 2\n"
    path = tmp_path / "mesh.ply"
    path.write_bytes(header + body)
    np.testing.assert_array_equal(load_point_cloud(path), [[0, 0, 0], [1, 0, 0], [0, 1, 0]])


def test_binary_ply_with_element_before_vertices(tmp_path: Path) -> None:
    header = (b"ply\nformat binary_little_endian 1.0\nelement camera 1\nproperty float f\n"
              b"element vertex 2\nproperty float x\nproperty float y\nproperty float z\nend_header\n")
    body = struct.pack("<f", 9.0) + np.array([[1, 2, 3], [4, 5, 6]], "<f4").tobytes()
    path = tmp_path / "cam.ply"
    path.write_bytes(header + body)
    np.testing.assert_array_equal(load_point_cloud(path), [[1, 2, 3], [4, 5, 6]])


def test_pcd_ascii_plain_and_packed_rgb(tmp_path: Path) -> None:
    head = "VERSION .7\nFIELDS x y z{}\nSIZE 4 4 4{}\nTYPE F F F{}\nCOUNT 1 1 1{}\nWIDTH 4\nHEIGHT 1\n" \
           "VIEWPOINT 0 0 0 1 0 0 0\nPOINTS 4\nDATA ascii\n"
    plain = tmp_path / "plain.pcd"
    plain.write_text("# .PCD v.7\n" + head.format("", "", "", "") + "".join(
        f"{x!r} {y!r} {z!r}\n" for x, y, z in XYZ.tolist()))
    np.testing.assert_array_equal(load_point_cloud(plain), XYZ)

    # PCL's convention: rgb is a float whose bits are 0x00RRGGBB, printed as a float in ascii.
    packed = [(int(r) << 16) | (int(g) << 8) | int(b) for r, g, b in RGB8]
    as_float = [struct.unpack("<f", struct.pack("<I", p))[0] for p in packed]
    coloured = tmp_path / "rgb.pcd"
    coloured.write_text(head.format(" rgb", " 4", " F", " 1") + "".join(
        f"{x!r} {y!r} {z!r} {c!r}\n" for (x, y, z), c in zip(XYZ.tolist(), as_float)))
    out = load_point_cloud(coloured)
    np.testing.assert_array_equal(out[:, :3], XYZ)
    np.testing.assert_allclose(out[:, 3:], RGB8 / 255.0, atol=1e-7)


def test_pcd_binary_and_separate_channels(tmp_path: Path) -> None:
    table = np.zeros(4, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"), ("b", "u1")])
    for i, c in enumerate("xyz"):
        table[c] = XYZ[:, i]
    for i, c in enumerate("rgb"):
        table[c] = RGB8[:, i]
    head = b"VERSION .7\nFIELDS x y z r g b\nSIZE 4 4 4 1 1 1\nTYPE F F F U U U\nCOUNT 1 1 1 1 1 1\n" \
           b"WIDTH 4\nHEIGHT 1\nPOINTS 4\nDATA binary\n"
    path = tmp_path / "bin.pcd"
    path.write_bytes(head + table.tobytes())
    out = load_point_cloud(path)
    np.testing.assert_array_equal(out[:, :3], XYZ)
    np.testing.assert_allclose(out[:, 3:], RGB8 / 255.0, atol=1e-7)


def test_text_formats(tmp_path: Path) -> None:
    ws = tmp_path / "a.xyz"
    ws.write_text("# scanner output\n" + "".join(f"{x!r}\t{y!r}  {z!r}\n" for x, y, z in XYZ.tolist()) + "\n")
    np.testing.assert_array_equal(load_point_cloud(ws), XYZ)

    csv = tmp_path / "b.txt"
    csv.write_text("x,y,z,r,g,b\n" + "".join(f"{x!r}, {y!r}, {z!r}, {r}, {g}, {b}\n" for (x, y, z), (r, g, b)
                                              in zip(XYZ.tolist(), RGB8.tolist())))
    out = load_point_cloud(csv)
    np.testing.assert_array_equal(out[:, :3], XYZ)
    np.testing.assert_allclose(out[:, 3:], RGB8 / 255.0, atol=1e-7)


@pytest.mark.parametrize("name,binary", [("a.npy", True), ("b.ply", True), ("c.ply", False), ("d.pcd", True),
                                         ("e.pcd", False), ("f.xyz", True), ("g.txt", True)])
def test_writer_round_trip(tmp_path: Path, name: str, binary: bool) -> None:
    points = np.concatenate([XYZ, RGB8 / 255.0], axis=1).astype(np.float32)
    out = load_point_cloud(save_point_cloud(tmp_path / name, points, binary=binary))
    np.testing.assert_allclose(out[:, :3], XYZ, rtol=1e-6)
    np.testing.assert_allclose(out[:, 3:], RGB8 / 255.0, atol=1e-6)
    xyz_only = load_point_cloud(save_point_cloud(tmp_path / ("xyz-" + name), XYZ, binary=binary))
    assert xyz_only.shape == (4, 3)


def test_suffix_is_case_insensitive(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", XYZ)
    (tmp_path / "a.npy").rename(tmp_path / "A.NPY")
    np.testing.assert_array_equal(load_point_cloud(tmp_path / "A.NPY"), XYZ)


def test_directory_and_missing_are_clear_errors(tmp_path: Path) -> None:
    for path, reason in ((tmp_path, "not a regular file"), (tmp_path / "nope.npy", "file not found")):
        with pytest.raises(InputError) as info:
            load_point_cloud(path)
        assert str(path) in str(info.value) and reason in info.value.reason


def test_huge_shape_in_header_is_refused_without_allocating(tmp_path: Path) -> None:
    path = tmp_path / "liar.npy"
    with path.open("wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 3)})
        f.write(XYZ.tobytes())
    with pytest.raises(InputError) as info:
        load_point_cloud(path)
    assert "liar.npy" in str(info.value) and "the limit is" in info.value.reason  # refused before reading

"""mmkit's modality contract, run against the pointcloud plugin."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmkit.testing import ModalityContract
from mmkit_plugin_pointcloud.io import save_point_cloud
from mmkit_plugin_pointcloud.shapes import sample_shape


class TestPointCloudContract(ModalityContract):
    modality = "pointcloud"
    # The frozen-encoder trap: the random PointNet++ must already separate the demo's five solids.
    separability_threshold = 0.65  # measured 0.86 on 100 held-out clouds; chance 0.2
    probe_max_records = 100

    def make_valid_files(self, tmp_path: Path) -> list[Path]:
        rng = np.random.default_rng(0)
        xyz = tmp_path / "sphere.npy"
        np.save(xyz, sample_shape("sphere", rng, 300).astype(np.float32))
        rgb = tmp_path / "cube_rgb.npy"  # LAMM N x 6 with 0-255 colours
        cube = sample_shape("cube", rng, 700)
        np.save(rgb, np.concatenate([cube, rng.integers(0, 256, size=(700, 3))], axis=1))
        ply = save_point_cloud(tmp_path / "torus.ply", sample_shape("torus", rng, 256))
        xyz_txt = save_point_cloud(tmp_path / "cone.xyz", sample_shape("cone", rng, 100))
        pcd = save_point_cloud(tmp_path / "cylinder.pcd", sample_shape("cylinder", rng, 400), binary=False)
        return [xyz, rgb, ply, xyz_txt, pcd]

    def make_invalid_files(self, tmp_path: Path) -> dict[str, Path]:
        good = np.random.default_rng(1).normal(size=(50, 3)).astype(np.float32)
        cases: dict[str, Path] = {}

        def npy(name: str, array: np.ndarray, **kw) -> None:
            path = tmp_path / f"{name}.npy"
            np.save(path, array, **kw)
            cases[name] = path

        def raw(name: str, data: bytes) -> None:
            path = tmp_path / name
            path.write_bytes(data)
            cases[name] = path

        npy("n_by_4", np.zeros((10, 4), np.float32))
        npy("one_d", np.zeros(30, np.float32))
        npy("three_d", np.zeros((2, 10, 3), np.float32))
        npy("empty", np.zeros((0, 3), np.float32))
        npy("nan", np.where(np.arange(50)[:, None] == 7, np.nan, good))
        npy("inf", np.where(np.arange(50)[:, None] == 3, np.inf, good))
        npy("object_array", np.array([[1, 2, 3], [4, 5, 6]], dtype=object), allow_pickle=True)
        npy("strings", np.array([["a", "b", "c"]]))
        npy("bool", np.ones((5, 3), dtype=bool))
        npy("colours_negative", np.concatenate([good, -np.ones((50, 3), np.float32)], axis=1))
        full = tmp_path / "full.npy"
        np.save(full, good)
        raw("truncated.npy", full.read_bytes()[:-40])
        raw("header_only.npy", full.read_bytes()[:60])
        raw("garbage.npy", b"\x00\x01garbage, not numpy at all" * 10)
        raw("bad_header.ply", b"ply\nformat ascii 1.0\nelement vertex ten\nproperty float x\nend_header\n")
        raw("no_end_header.ply", b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\n")
        raw("no_xyz.ply", b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float u\nend_header\n1\n")
        raw("truncated_binary.ply", b"ply\nformat binary_little_endian 1.0\nelement vertex 100\nproperty float x\n"
                                    b"property float y\nproperty float z\nend_header\n" + b"\x00" * 50)
        raw("not_ply.ply", b"PK\x03\x04 zip bytes")
        raw("bad_data.pcd", b"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 2\nHEIGHT 1\n"
                            b"POINTS 2\nDATA sideways\n1 2 3\n4 5 6\n")
        raw("short.pcd", b"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 5\nHEIGHT 1\n"
                         b"POINTS 5\nDATA ascii\n1 2 3\n")
        raw("compressed.pcd", b"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 5\n"
                              b"HEIGHT 1\nPOINTS 5\nDATA binary_compressed\n\x00\x00")
        raw("four_columns.txt", b"1 2 3 4\n5 6 7 8\n")
        raw("ragged.xyz", b"1 2 3\n4 5\n")
        raw("words.xyz", b"1 2 3\n4 five 6\n")
        raw("empty.xyz", b"# nothing here\n")
        raw("binary.xyz", b"\x00\xff" * 100)
        raw("cloud.bin", good.tobytes())
        return cases

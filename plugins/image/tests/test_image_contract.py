"""mmkit's modality contract, run against the ``image`` modality."""

from __future__ import annotations

from pathlib import Path

from image_files import gradient, write_image, zero_size_png

from mmkit.testing import ModalityContract


class TestImageContract(ModalityContract):
    modality = "image"
    # The frozen-encoder trap: the tiny random CLIP must already separate the demo's classes.
    separability_threshold = 0.5  # measured 0.67 on 100 held-out digits; chance 0.1
    probe_max_records = 100

    def make_valid_files(self, tmp_path: Path) -> list[Path]:
        return [
            write_image(tmp_path / "pattern.png", gradient()),
            write_image(tmp_path / "photo.jpg", gradient(40, 30, flip=True), quality=90),
        ]

    def make_invalid_files(self, tmp_path: Path) -> dict[str, Path]:
        corrupt = tmp_path / "corrupt.png"
        corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
        full = write_image(tmp_path / "full.png", gradient(64, 64)).read_bytes()
        truncated = tmp_path / "truncated.png"
        truncated.write_bytes(full[: len(full) // 2])
        empty = tmp_path / "empty.png"
        empty.write_bytes(b"")
        text = tmp_path / "notes.jpg"
        text.write_text("this is a text file, not a JPEG\n")
        return {
            "garbage after a PNG signature": corrupt,
            "truncated PNG": truncated,
            "zero-byte file": empty,
            "text file named .jpg": text,
            "0x0 PNG": zero_size_png(tmp_path / "zero.png"),
            "a directory": _mkdir(tmp_path / "folder.png"),
        }


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path

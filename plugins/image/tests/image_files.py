"""Small image-file writers shared by the tests (a uniquely named module, so the test folders of
several plugins can be collected in one pytest run)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, pixels: np.ndarray, **save_options) -> Path:
    """Save a uint8 ``[H, W]`` or ``[H, W, C]`` array; the format follows the suffix."""
    Image.fromarray(pixels).save(path, **save_options)
    return path


def gradient(h: int = 24, w: int = 32, *, flip: bool = False) -> np.ndarray:
    """A deterministic RGB test pattern (two different ones with ``flip``)."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], axis=-1)
    rgb = rgb.astype(np.uint8)
    return rgb[::-1, ::-1].copy() if flip else rgb


def zero_size_png(path: Path) -> Path:
    """A structurally valid PNG whose header says 0 x 0 pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path

"""WAV writers for the tests: PCM through the stdlib ``wave`` module, float and odd encodings by
hand-built RIFF chunks (the cases a plugin must reject are easiest to write byte by byte)."""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import numpy as np


def tone(freq: float, *, seconds: float = 0.25, rate: int = 16000, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


def write_pcm(path: Path, samples: np.ndarray, *, rate: int = 16000, width: int = 2) -> Path:
    """``samples``: floats in [-1, 1], shape ``[n]`` (mono) or ``[n, channels]``."""
    frames = np.asarray(samples, dtype=np.float64)
    frames = frames[:, None] if frames.ndim == 1 else frames
    scale = float(1 << (8 * width - 1)) - 1
    ints = np.round(frames * scale).astype(np.int64)
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()
    elif width == 3:
        raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints.reshape(-1))
    else:
        raw = ints.astype(f"<i{width}").tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(frames.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    return path


def riff(fmt_body: bytes, data: bytes, *, declared_data_size: int | None = None) -> bytes:
    """A RIFF/WAVE file with the given ``fmt `` chunk body and ``data`` payload."""
    size = len(data) if declared_data_size is None else declared_data_size
    chunks = b"fmt " + struct.pack("<I", len(fmt_body)) + fmt_body + b"data" + struct.pack("<I", size) + data
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def fmt_chunk(tag: int, channels: int, rate: int, bits: int) -> bytes:
    block = channels * bits // 8
    return struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)


def write_float(path: Path, samples: np.ndarray, *, rate: int = 16000, bits: int = 32,
                extensible: bool = False) -> Path:
    frames = np.asarray(samples, dtype=f"<f{bits // 8}")
    channels = 1 if frames.ndim == 1 else frames.shape[1]
    if extensible:  # WAVE_FORMAT_EXTENSIBLE whose sub-format GUID starts with 0x0003 (float)
        body = fmt_chunk(0xFFFE, channels, rate, bits) + struct.pack("<HHI", 22, bits, 0) + \
            struct.pack("<H", 3) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    else:
        body = fmt_chunk(3, channels, rate, bits)
    path.write_bytes(riff(body, frames.tobytes()))
    return path

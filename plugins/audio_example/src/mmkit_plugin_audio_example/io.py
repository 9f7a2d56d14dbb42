"""Reading and writing WAV files: the modality's ``load`` function and the demo's writer.

Only numpy, the standard library and :mod:`mmkit.io`: this module runs in data-loader workers and wherever a
dataset's files are validated, where importing torch would be wasted time.

Plain PCM (8/16/24/32-bit) is read with the stdlib :mod:`wave` module. What ``wave`` rejects as an
"unknown format" (IEEE float, and on Python < 3.12 also WAVE_FORMAT_EXTENSIBLE) is read by a small
RIFF chunk walker. Every problem is raised as :class:`mmkit.InputError` naming the file, so that
``mmkit`` can report *which* file of a dataset is broken and why.
"""

from __future__ import annotations

import struct
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mmkit import InputError
from mmkit.io import check_file, check_finite

_PCM, _FLOAT, _EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
_PCM_WIDTHS = (1, 2, 3, 4)  # bytes per sample
_FLOAT_WIDTHS = (4, 8)


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays with == is not a bool
class Audio:
    """A decoded clip: mono float32 samples in [-1, 1] (float files may exceed it) and their rate."""

    waveform: np.ndarray
    sample_rate: int

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return len(self.waveform) / self.sample_rate


@dataclass(frozen=True)
class _Format:
    tag: int  # _PCM or _FLOAT after resolving WAVE_FORMAT_EXTENSIBLE
    channels: int
    sample_rate: int
    width: int  # bytes per sample of one channel


def load_wav(path: str | Path) -> Audio:
    """Decode a WAV file to mono float32; raise :class:`mmkit.InputError` if it is unusable."""
    path = Path(path)
    check_file(path)  # exists, a regular file, not empty
    with path.open("rb") as f:
        head = f.read(12)
    _check_magic(path, head)
    try:
        fmt, frames = _read_with_wave(path)
    except _UnknownFormat:
        fmt, frames = _read_riff(path)
    samples = _decode(path, frames, fmt)
    if samples.shape[0] == 0:
        raise InputError(path, "contains no audio samples (zero-length data chunk)")
    check_finite(path, samples)
    # Down-mix: the encoder sees one channel; averaging keeps the level of correlated channels.
    mono = samples.mean(axis=1) if fmt.channels > 1 else samples[:, 0]
    return Audio(np.ascontiguousarray(mono, dtype=np.float32), fmt.sample_rate)


def write_wav(path: str | Path, waveform: np.ndarray, sample_rate: int) -> Path:
    """Write mono float samples (clipped to [-1, 1]) as a 16-bit PCM WAV file."""
    path = Path(path)
    pcm = np.round(np.clip(np.asarray(waveform, dtype=np.float64), -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    return path


# -- internals -------------------------------------------------------------------------------------


class _UnknownFormat(Exception):
    """``wave`` does not read this format tag; the RIFF walker may."""


def _check_magic(path: Path, head: bytes) -> None:
    if len(head) == 0:
        raise InputError(path, "empty file")
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return
    if len(head) < 12 and head[:4] == b"RIFF":
        raise InputError(path, "truncated WAV header")
    if head[:4] in (b"RIFX", b"RF64"):
        raise InputError(path, f"{head[:4].decode()} WAV files are not supported (only little-endian RIFF)")
    what = "a PNG image" if head.startswith(b"\x89PNG") else f"data starting with {head[:8]!r}"
    raise InputError(path, f"not a WAV file: expected a RIFF/WAVE header, found {what}")


def _read_with_wave(path: Path) -> tuple[_Format, bytes]:
    try:
        with wave.open(str(path), "rb") as w:
            fmt = _Format(_PCM, w.getnchannels(), w.getframerate(), w.getsampwidth())
            declared = w.getnframes()
            frames = w.readframes(declared)
    except wave.Error as exc:
        if str(exc).startswith("unknown format"):
            raise _UnknownFormat from exc
        raise InputError(path, f"malformed WAV file: {exc}") from exc
    except EOFError as exc:
        raise InputError(path, "truncated WAV header") from exc
    frame_size = max(fmt.channels * fmt.width, 1)
    if len(frames) < declared * frame_size:
        raise InputError(path, f"truncated audio data: header declares {declared} frames, "
                               f"file holds {len(frames) // frame_size}")
    return fmt, frames


def _read_riff(path: Path) -> tuple[_Format, bytes]:
    """Walk the RIFF chunks for ``fmt `` and ``data`` (formats the ``wave`` module rejects)."""
    data = path.read_bytes()
    pos, fmt, payload = 12, None, None
    while pos + 8 <= len(data):
        chunk_id, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        body = data[pos + 8:pos + 8 + size]
        if chunk_id == b"fmt ":
            fmt = _parse_fmt(path, body)
        elif chunk_id == b"data":
            if len(body) < size:
                raise InputError(path, f"truncated audio data: data chunk declares {size} bytes, "
                                       f"file holds {len(body)}")
            payload = body
            break
        pos += 8 + size + (size & 1)  # chunks are word-aligned
    if fmt is None or payload is None:
        raise InputError(path, "truncated or malformed WAV file: fmt and/or data chunk missing")
    return fmt, payload


def _parse_fmt(path: Path, body: bytes) -> _Format:
    if len(body) < 16:
        raise InputError(path, "truncated WAV header: fmt chunk too short")
    tag, channels, rate, _byte_rate, _block_align, bits = struct.unpack("<HHIIHH", body[:16])
    if tag == _EXTENSIBLE:
        if len(body) < 26:
            raise InputError(path, "truncated WAV header: WAVE_FORMAT_EXTENSIBLE fmt chunk too short")
        tag = struct.unpack("<H", body[24:26])[0]  # first two bytes of the sub-format GUID
    if tag not in (_PCM, _FLOAT):
        raise InputError(path, f"unsupported WAV encoding (format tag 0x{tag:04x}); "
                               "only PCM and IEEE float are read")
    return _Format(tag, channels, rate, (bits + 7) // 8)


def _decode(path: Path, frames: bytes, fmt: _Format) -> np.ndarray:
    """Raw little-endian frames -> float array ``[n_frames, channels]``."""
    if fmt.channels < 1:
        raise InputError(path, f"invalid channel count {fmt.channels}")
    if fmt.sample_rate <= 0:
        raise InputError(path, f"invalid sample rate {fmt.sample_rate}")
    widths = _PCM_WIDTHS if fmt.tag == _PCM else _FLOAT_WIDTHS
    if fmt.width not in widths:
        kind = "PCM" if fmt.tag == _PCM else "float"
        raise InputError(path, f"unsupported sample width for {kind}: {8 * fmt.width} bits")
    frame_size = fmt.channels * fmt.width
    if len(frames) % frame_size:
        raise InputError(path, "truncated audio data: the last frame is incomplete")
    if fmt.tag == _FLOAT:
        samples = np.frombuffer(frames, dtype=f"<f{fmt.width}").astype(np.float64)
    elif fmt.width == 1:  # 8-bit WAV is unsigned, centred on 128
        samples = (np.frombuffer(frames, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    elif fmt.width == 3:  # no numpy dtype for int24: sign-extend three bytes into an int32
        raw = np.frombuffer(frames, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        samples = np.where(ints >= 1 << 23, ints - (1 << 24), ints) / float(1 << 23)
    else:
        samples = np.frombuffer(frames, dtype=f"<i{fmt.width}").astype(np.float64) / float(1 << (8 * fmt.width - 1))
    return samples.reshape(-1, fmt.channels)

"""The WAV reader: formats it decodes, and the errors it gives for files it cannot use."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from mmkit import InputError

from mmkit_plugin_audio_example.io import Audio, load_wav, write_wav
from wavfiles import fmt_chunk, riff, tone, write_float, write_pcm


@pytest.mark.parametrize("width, tol", [(1, 1 / 127), (2, 1 / 32767), (3, 1 / 8388607), (4, 1e-7)])
def test_pcm_widths_decode_to_the_same_float_signal(tmp_path: Path, width: int, tol: float) -> None:
    signal = tone(440, seconds=0.1)
    audio = load_wav(write_pcm(tmp_path / f"w{width}.wav", signal, width=width))
    assert isinstance(audio, Audio) and audio.sample_rate == 16000
    assert audio.waveform.dtype == np.float32 and audio.waveform.shape == signal.shape
    # Each width's full scale maps to 1.0 (up to the half-step asymmetry of two's complement).
    np.testing.assert_allclose(audio.waveform, signal, atol=tol * 1.01)


def test_8bit_is_unsigned(tmp_path: Path) -> None:
    path = tmp_path / "u8.wav"
    path.write_bytes(riff(fmt_chunk(1, 1, 8000, 8), bytes([0, 128, 255])))
    np.testing.assert_allclose(load_wav(path).waveform, [-1.0, 0.0, 127 / 128])


def test_stereo_is_averaged_to_mono(tmp_path: Path) -> None:
    left, right = tone(440, seconds=0.05), tone(1000, seconds=0.05, amplitude=0.25)
    audio = load_wav(write_pcm(tmp_path / "st.wav", np.stack([left, right], axis=1)))
    assert audio.waveform.ndim == 1
    np.testing.assert_allclose(audio.waveform, (left + right) / 2, atol=2 / 32767)


@pytest.mark.parametrize("bits, extensible", [(32, False), (64, False), (32, True)])
def test_ieee_float(tmp_path: Path, bits: int, extensible: bool) -> None:
    signal = tone(300, seconds=0.05, rate=22050, amplitude=1.5)  # float WAV may exceed full scale
    audio = load_wav(write_float(tmp_path / "f.wav", signal, rate=22050, bits=bits, extensible=extensible))
    assert audio.sample_rate == 22050
    np.testing.assert_allclose(audio.waveform, signal, atol=1e-6)


def test_extensible_pcm(tmp_path: Path) -> None:
    body = fmt_chunk(0xFFFE, 1, 16000, 16) + struct.pack("<HHI", 22, 16, 4) + struct.pack("<H", 1) + bytes(14)
    path = tmp_path / "ext.wav"
    path.write_bytes(riff(body, np.array([0, 16384, -32768], dtype="<i2").tobytes()))
    np.testing.assert_allclose(load_wav(path).waveform, [0.0, 0.5, -1.0])


def test_extra_chunks_are_skipped(tmp_path: Path) -> None:
    data = write_pcm(tmp_path / "plain.wav", tone(440, seconds=0.01)).read_bytes()
    odd = b"LIST" + struct.pack("<I", 5) + b"INFOx" + b"\x00"  # odd size: padded to a word
    with_list = data[:12] + odd + data[12:]
    path = tmp_path / "list.wav"
    path.write_bytes(b"RIFF" + struct.pack("<I", len(with_list) - 8) + with_list[8:])
    np.testing.assert_array_equal(load_wav(path).waveform, load_wav(tmp_path / "plain.wav").waveform)


def test_write_wav_round_trip(tmp_path: Path) -> None:
    signal = tone(523.25, seconds=0.2, amplitude=0.8)
    audio = load_wav(write_wav(tmp_path / "rt.wav", signal, 16000))
    assert audio.duration == pytest.approx(0.2)
    np.testing.assert_allclose(audio.waveform, signal, atol=2 / 32767)  # scale 32767 in, 32768 out


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found") as info:
        load_wav(tmp_path / "nope.wav")
    assert info.value.path == str(tmp_path / "nope.wav")


def test_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a regular file"):
        load_wav(tmp_path)


UNUSABLE = [
    (b"not audio at all", "not a WAV file"),
    (b"\x89PNG\r\n\x1a\n" + bytes(32), "PNG image"),
    (b"RIFF\x10\x00", "truncated WAV header"),
    (riff(fmt_chunk(1, 1, 16000, 16), b""), "no audio samples"),
    (riff(fmt_chunk(1, 1, 16000, 16), bytes(100), declared_data_size=1000), "truncated audio data"),
    (riff(fmt_chunk(3, 1, 16000, 32), bytes(100), declared_data_size=1000), "truncated audio data"),
    (riff(fmt_chunk(3, 1, 16000, 32), bytes(6)), "last frame is incomplete"),
    (riff(fmt_chunk(3, 1, 16000, 16), bytes(8)), "unsupported sample width for float: 16 bits"),
    (riff(fmt_chunk(0x55, 1, 16000, 16), bytes(8)), "format tag 0x0055"),
    (riff(fmt_chunk(1, 1, 0, 16), bytes(8)), "invalid sample rate 0"),
    (b"RIFF" + struct.pack("<I", 4) + b"WAVE", "fmt chunk and/or data chunk missing"),
]


@pytest.mark.parametrize("data, reason", UNUSABLE, ids=[reason for _, reason in UNUSABLE])
def test_unusable_files(tmp_path: Path, data: bytes, reason: str) -> None:
    path = tmp_path / "bad.wav"
    path.write_bytes(data)
    with pytest.raises(InputError, match=reason) as info:
        load_wav(path)
    assert str(path) in str(info.value)


def test_infinite_float_samples(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="NaN or infinite"):
        load_wav(write_float(tmp_path / "inf.wav", np.array([0.0, np.inf])))

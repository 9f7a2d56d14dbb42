"""The mmkit contract suite, pointed at this plugin's modality."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from mmkit.testing import ModalityContract

from wavfiles import fmt_chunk, riff, tone, write_float, write_pcm


class TestAudioContract(ModalityContract):
    modality = "audio_example"
    # The frozen-encoder trap: the tiny random Whisper must already separate the demo's four waveforms.
    separability_threshold = 0.75  # measured 0.94 on 64 held-out clips; chance 0.25-0.3
    probe_max_records = 64

    def make_valid_files(self, tmp_path: Path) -> list[Path]:
        stereo = np.stack([tone(880, rate=44100), tone(660, rate=44100)], axis=1)
        return [
            write_pcm(tmp_path / "a440.wav", tone(440)),
            write_pcm(tmp_path / "stereo-44k-24bit.wav", stereo, rate=44100, width=3),  # resampled
            write_float(tmp_path / "noise-float.wav", np.random.default_rng(0).uniform(-0.5, 0.5, 8000), rate=8000),
        ]

    def make_invalid_files(self, tmp_path: Path) -> dict[str, Path]:
        valid = write_pcm(tmp_path / "valid.wav", tone(440)).read_bytes()
        pcm16 = fmt_chunk(1, 1, 16000, 16)
        cases = {
            "text renamed .wav": b"hello, I am not audio\n",
            "PNG renamed .wav": b"\x89PNG\r\n\x1a\n" + bytes(64),
            "empty file": b"",
            "truncated header": valid[:30],
            "truncated data": valid[:60],
            "zero samples": riff(pcm16, b""),
            "unsupported compression (IMA ADPCM)": riff(fmt_chunk(0x11, 1, 16000, 4), bytes(64)),
            "unsupported sample width (64-bit PCM)": riff(fmt_chunk(1, 1, 16000, 64), bytes(64)),
            "zero channels": riff(fmt_chunk(1, 0, 16000, 16), bytes(64)),
            "big-endian RIFX": b"RIFX" + valid[4:],
        }
        paths = {}
        for i, (name, data) in enumerate(cases.items()):
            paths[name] = tmp_path / f"bad{i}.wav"
            paths[name].write_bytes(data)
        paths["NaN samples (float WAV)"] = write_float(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2]))
        return paths

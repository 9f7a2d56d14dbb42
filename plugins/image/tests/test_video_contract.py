"""mmkit's modality contract, run against the ``video`` modality (a variable-size encoder: clips of
different frame counts get different token counts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mmkit.testing import ModalityContract


def _clip(count: int, seed: int, size: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, size, size, 3), np.uint8)


def _gif(path: Path, clip: np.ndarray) -> Path:
    frames = [Image.fromarray(f) for f in clip]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, disposal=1)
    return path


def _folder(path: Path, clip: np.ndarray) -> Path:
    path.mkdir()
    for t, frame in enumerate(clip):
        Image.fromarray(frame).save(path / f"frame_{t:03d}.png")
    return path


class TestVideoContract(ModalityContract):
    modality = "video"
    # The direction of motion needs the frames' order, which the probe's mean/std pooling discards;
    # test_video_demo.py probes the frozen demo features with the order kept instead.
    separability_threshold = None

    def make_valid_files(self, tmp_path: Path) -> list[Path]:
        files = [_gif(tmp_path / "three.gif", _clip(3, 0)), _folder(tmp_path / "twelve", _clip(12, 1)),
                 _gif(tmp_path / "one.gif", _clip(1, 2))]
        try:
            import av  # noqa: F401
        except ImportError:
            return files
        from test_video_io import write_mp4

        return files + [write_mp4(tmp_path / "five.mp4", _clip(5, 3, size=32))]

    def make_invalid_files(self, tmp_path: Path) -> dict[str, Path]:
        garbage = tmp_path / "garbage.gif"
        garbage.write_bytes(b"GIF89a" + bytes(range(256)) * 4)
        whole = _gif(tmp_path / "whole.gif", _clip(6, 4, size=48)).read_bytes()
        truncated = tmp_path / "truncated.gif"
        truncated.write_bytes(whole[: len(whole) // 2])
        empty = tmp_path / "empty.gif"
        empty.write_bytes(b"")
        text = tmp_path / "notes.mp4"
        text.write_text("this is a text file, not a video\n")
        empty_folder = tmp_path / "no_frames"
        empty_folder.mkdir()
        (empty_folder / "README.txt").write_text("frames go here\n")
        bad_frame = _folder(tmp_path / "bad_frame", _clip(2, 5))
        (bad_frame / "frame_002.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
        return {
            "garbage after a GIF signature": garbage,
            "truncated GIF": truncated,
            "zero-byte file": empty,
            "text file named .mp4": text,
            "folder without frames": empty_folder,
            "folder with a corrupt frame": bad_frame,
        }

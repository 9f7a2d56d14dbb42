"""``load_video``: frame folders, animated GIFs, PyAV video files, uniform frame sampling, and the
errors for unusable inputs (each an InputError naming the file)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmkit.errors import InputError
from mmkit_plugin_image.video_io import VideoClip, load_video, sample_indices


def frames(count: int, size: int = 16) -> np.ndarray:
    """``count`` distinct frames: frame t is grey level 20 * t with a white pixel at column t."""
    clip = np.zeros((count, size, size, 3), np.uint8)
    for t in range(count):
        clip[t] = 20 * t
        clip[t, 0, t % size] = 255
    return clip


def write_gif(path: Path, clip: np.ndarray) -> Path:
    images = [Image.fromarray(f) for f in clip]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0, disposal=1)
    return path


def write_folder(folder: Path, clip: np.ndarray, names: list[str] | None = None) -> Path:
    folder.mkdir()
    for t, frame in enumerate(clip):
        Image.fromarray(frame).save(folder / (names[t] if names else f"frame_{t:04d}.png"))
    return folder


def write_mp4(path: Path, clip: np.ndarray, fps: int = 10, gop: int | None = None) -> Path:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = clip.shape[2], clip.shape[1], "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop  # a keyframe every gop frames
        for frame in clip:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def grey_levels(images: list[Image.Image]) -> list[int]:
    return [int(np.median(np.asarray(img))) for img in images]


# -- sampling ------------------------------------------------------------------------------------
def test_short_clips_keep_every_frame() -> None:
    assert sample_indices(1, 8) == [0]
    assert sample_indices(5, 8) == [0, 1, 2, 3, 4]
    assert sample_indices(8, 8) == list(range(8))


def test_long_clips_take_the_middle_of_equal_segments() -> None:
    assert sample_indices(16, 8) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert sample_indices(100, 4) == [12, 37, 62, 87]
    assert sample_indices(9, 1) == [4]
    for total in range(9, 200, 7):
        picked = sample_indices(total, 8)
        assert len(picked) == 8 and picked == sorted(set(picked))
        # Spread over the whole clip: the gaps differ by at most one frame.
        gaps = np.diff([-0.5 * total / 8, *picked])
        assert 0 <= picked[0] < total / 8 and total - total / 8 <= picked[-1] < total
        assert gaps[1:].max() - gaps[1:].min() <= 1


def test_sampling_refuses_empty() -> None:
    with pytest.raises(ValueError):
        sample_indices(0, 8)
    with pytest.raises(ValueError):
        sample_indices(5, 0)


# -- reading -------------------------------------------------------------------------------------
def test_gif_frames_read_back_exactly(tmp_path: Path) -> None:
    clip = frames(6)
    video = load_video(write_gif(tmp_path / "a.gif", clip))
    assert isinstance(video, VideoClip) and (video.kind, video.num_frames) == ("pillow", 6)
    got = video.read([0, 2, 5])
    assert all(img.mode == "RGB" and img.size == (16, 16) for img in got)
    for img, t in zip(got, [0, 2, 5]):
        assert np.array_equal(np.asarray(img), clip[t])


def test_frame_folder_in_numeric_order(tmp_path: Path) -> None:
    clip = frames(12)
    # Unpadded numbers: "frame10" must come after "frame9", not after "frame1"; other files are ignored.
    folder = write_folder(tmp_path / "clip", clip, [f"frame{t}.png" for t in range(12)])
    (folder / "README.txt").write_text("frames of a test clip\n")
    video = load_video(str(folder))
    assert (video.kind, video.num_frames) == ("frames", 12)
    assert [Path(f).name for f in video.frame_files][8:11] == ["frame8.png", "frame9.png", "frame10.png"]
    assert grey_levels(video.read(range(12))) == [20 * t for t in range(12)]


def test_jpeg_frame_folder(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "jpg", frames(3), [f"{t:05d}.jpg" for t in range(3)])
    assert load_video(folder).num_frames == 3


def test_mp4_through_pyav(tmp_path: Path) -> None:
    clip = frames(10, size=32)
    video = load_video(write_mp4(tmp_path / "clip.mp4", clip))
    assert (video.kind, video.num_frames) == ("av", 10)
    got = video.read(sample_indices(10, 4))
    assert [img.size for img in got] == [(32, 32)] * 4
    # Lossy, but the grey levels of the sampled frames (1, 3, 6, 8) come through.
    assert np.allclose(grey_levels(got), [20, 60, 120, 160], atol=6)


def test_long_video_seeks_to_the_sampled_frames(tmp_path: Path) -> None:
    """Sampled frames are reached by seeking (a group of pictures each), and are exactly the frames a
    decode from the start gives."""
    from mmkit_plugin_image.video_io import _read_av, _seek_av

    clip = np.zeros((60, 32, 32, 3), np.uint8)
    for t in range(60):
        clip[t] = 4 * t
    path = write_mp4(tmp_path / "long.mp4", clip, gop=12)
    video = load_video(path)
    assert video.num_frames == 60 and len(video.frame_pts) == 60
    picked = sample_indices(60, 8)
    seeking = _seek_av(path, picked, video.frame_pts)
    assert seeking is not None
    from_start = _read_av(path, picked, 60)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(seeking, from_start))
    assert np.allclose(grey_levels(video.read(picked)), [4 * i for i in picked], atol=6)


def test_video_clips_pickle(tmp_path: Path) -> None:
    import pickle

    video = load_video(write_gif(tmp_path / "a.gif", frames(4)))
    again = pickle.loads(pickle.dumps(video))
    assert again == video and grey_levels(again.read([3])) == [60]


# -- errors --------------------------------------------------------------------------------------
def _refused(path: Path, words: str, named: Path | None = None) -> InputError:
    with pytest.raises(InputError) as info:
        clip = load_video(path)
        clip.read(range(clip.num_frames))
    assert (named or path).name in str(info.value) and words in str(info.value), str(info.value)
    return info.value


def test_missing_and_empty_inputs(tmp_path: Path) -> None:
    _refused(tmp_path / "nowhere.gif", "file not found")
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", "empty frame folder")
    (tmp_path / "zero.gif").write_bytes(b"")
    _refused(tmp_path / "zero.gif", "empty file")


def test_corrupt_and_truncated_gif(tmp_path: Path) -> None:
    (tmp_path / "garbage.gif").write_bytes(b"GIF89a" + bytes(range(256)) * 3)
    _refused(tmp_path / "garbage.gif", "")
    whole = write_gif(tmp_path / "whole.gif", np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), np.uint8))
    data = whole.read_bytes()
    (tmp_path / "cut.gif").write_bytes(data[: len(data) // 2])
    error = _refused(tmp_path / "cut.gif", "")
    # the reason is about the file, not Python: no exception class from inside the decoder
    assert not re.search(r"\b(Index|EOF|Syntax|Key|Type)Error\b", str(error)), str(error)
    for cut in (2, 3, 4):
        (tmp_path / f"cut{cut}.gif").write_bytes(data[: len(data) * (cut - 1) // cut])
        error = _refused(tmp_path / f"cut{cut}.gif", "")
        assert "Error:" not in str(error), str(error)
    (tmp_path / "notes.gif").write_text("not a gif\n")
    _refused(tmp_path / "notes.gif", "not a readable")


def test_bad_frame_folders_name_the_frame(tmp_path: Path) -> None:
    clip = frames(3)
    folder = write_folder(tmp_path / "unnumbered", clip, ["a.png", "b.png", "c.png"])
    _refused(folder, "no frame number", folder / "a.png")
    folder = write_folder(tmp_path / "twice", clip, ["f1.png", "f01.png", "f2.png"])
    error = _refused(folder, "order is ambiguous")
    assert error.path.endswith(("f1.png", "f01.png"))
    folder = write_folder(tmp_path / "sizes", clip[:2], ["f1.png", "f2.png"])
    Image.fromarray(frames(1, size=8)[0]).save(folder / "f3.png")
    _refused(folder, "one size", folder / "f3.png")
    folder = write_folder(tmp_path / "garbage", clip[:2], ["f1.png", "f2.png"])
    (folder / "f3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    _refused(folder, "not a readable image", folder / "f3.png")
    # A truncated frame has a readable header: it is caught when decoded, still naming the frame.
    folder = write_folder(tmp_path / "truncated", frames(2, size=64), ["f1.png", "f2.png"])
    noisy = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)).save(noisy)
    (folder / "f2.png").write_bytes(noisy.read_bytes()[:400])
    _refused(folder, "truncated", folder / "f2.png")


def test_corrupt_video_file(tmp_path: Path) -> None:
    pytest.importorskip("av")
    (tmp_path / "garbage.mp4").write_bytes(bytes(range(256)) * 16)
    _refused(tmp_path / "garbage.mp4", "not a readable video")


# -- a folder is one input to mmkit's data path ----------------------------------------------------
def test_records_and_feature_cache_take_a_frame_folder(tmp_path: Path) -> None:
    from mmkit.data.feature_cache import content_hash
    from mmkit.errors import DataError
    from mmkit.plugins import PluginHost
    from mmkit.records import ReadContext, parse_record

    folder = write_folder(tmp_path / "clip", frames(3))
    record = {"id": "a", "video": "clip",
              "conversations": [{"from": "human", "value": "<video>\nWhich way?"}, {"from": "gpt", "value": "up"}]}
    ctx = ReadContext(modalities=PluginHost().modalities(), data_root=tmp_path, check_files=True)
    sample = parse_record(record, ctx=ctx, base=tmp_path, source="t", index=0)
    assert list(sample.inputs["video"]) == [str(folder)]
    with pytest.raises(DataError, match="file not found"):
        parse_record({**record, "video": "elsewhere"}, ctx=ctx, base=tmp_path, source="t", index=0)
    # The cache key follows every frame's name and bytes.
    key = content_hash(folder)
    assert content_hash(folder) == key
    Image.fromarray(frames(3)[::-1][0]).save(folder / "frame_0000.png")
    changed = content_hash(folder)
    assert changed != key
    (folder / "frame_0002.png").rename(folder / "frame_0003.png")
    assert content_hash(folder) not in (key, changed)

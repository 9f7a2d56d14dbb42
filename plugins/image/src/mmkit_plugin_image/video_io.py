"""Open and validate one video: a folder of numbered frames, an animated GIF (Pillow), or a video
file decoded with PyAV.

``load_video`` checks the whole input (every frame folder entry's header, every GIF frame, every
video packet) and returns a small picklable :class:`VideoClip` that knows its frame count; the
encoder's ``preprocess`` then decodes only the frames it samples (:func:`sample_indices`), so a long
video is never held in memory whole. Every failure is a :class:`mmkit.errors.InputError` naming the
file (the frame file, for a folder).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mmkit import InputError

from mmkit_plugin_image.io import _to_rgb, decode_problem

#: Frame files a frame folder may hold (other files, e.g. a README, are ignored).
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: Single files decoded with Pillow (animated GIF, APNG, animated WebP).
PILLOW_SUFFIXES = (".gif", ".png", ".apng", ".webp")
#: Single files decoded with PyAV (FFmpeg).
AV_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ogv", ".wmv", ".flv")
VIDEO_FILE_TYPES = tuple(dict.fromkeys((".gif", ".apng", *AV_SUFFIXES)))
#: A clip holding more pixels than this (frames x width x height) is refused, as Pillow refuses a
#: decompression bomb: 64 full-size images' worth.
MAX_CLIP_PIXELS = 64 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
_NUMBER = re.compile(r"\d+")


def sample_indices(total: int, max_frames: int) -> list[int]:
    """Up to ``max_frames`` of ``total`` frame indices spread uniformly over the clip: every frame
    when the clip is short enough, else the middle frame of each of ``max_frames`` equal segments
    (TSN-style; first and last segments are covered alike)."""
    if total < 1 or max_frames < 1:
        raise ValueError(f"sample_indices: total={total}, max_frames={max_frames}; both must be >= 1")
    if total <= max_frames:
        return list(range(total))
    return [int((2 * i + 1) * total // (2 * max_frames)) for i in range(max_frames)]


@dataclass(frozen=True)
class VideoClip:
    """A validated video: where its frames are and how many there are. ``read(indices)`` decodes
    those frames as RGB images."""

    path: str
    kind: str  # "frames" (a folder), "pillow" (animated image file), "av" (PyAV) or "memory"
    num_frames: int
    frame_files: tuple[str, ...] = ()  # kind "frames": the files in frame order
    images: tuple[Image.Image, ...] = ()  # kind "memory": the frames themselves
    frame_pts: tuple[int, ...] = ()  # kind "av": each frame's presentation time, in order (for seeking)

    def read(self, indices: Sequence[int]) -> list[Image.Image]:
        bad = [i for i in indices if not 0 <= i < self.num_frames]
        if bad:
            raise IndexError(f"{self.path}: frame indices {bad} outside 0..{self.num_frames - 1}")
        if self.kind == "memory":
            return [self.images[i] for i in indices]
        if self.kind == "frames":
            return [_decode_image(Path(self.frame_files[i])) for i in indices]
        if self.kind == "pillow":
            return _read_pillow(Path(self.path), indices)
        if self.kind == "av":
            if len(self.frame_pts) == self.num_frames:
                frames = _seek_av(Path(self.path), indices, self.frame_pts)
                if frames is not None:
                    return frames
            return _read_av(Path(self.path), indices, self.num_frames)
        raise ValueError(f"unknown clip kind {self.kind!r}")


def clip_from_frames(frames: Sequence[Image.Image], name: str = "<memory>") -> VideoClip:
    """A clip of frames already in memory (from the Python API or a test)."""
    images = tuple(f if f.mode == "RGB" else f.convert("RGB") for f in frames)
    if not images:
        raise InputError("a video needs at least one frame, got none")
    return VideoClip(path=name, kind="memory", num_frames=len(images), images=images)


def load_video(path: str | os.PathLike[str]) -> VideoClip:
    """Validate a video and return its :class:`VideoClip` (frames are decoded later, when sampled).

    - a directory: its numbered frame files (``frame_0001.png`` ..., ordered by the number in the
      name); an empty folder, unnumbered or doubly numbered frames, unreadable frames and frames of
      different sizes are refused;
    - an animated image (GIF, APNG, animated WebP): every frame is decoded once here, so a corrupt or
      truncated file is refused now;
    - a video file (``.mp4``, ``.webm``, ``.avi``, ...): opened with PyAV, its packets demuxed and the
      first frame decoded (needs the ``av`` package).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        return _load_folder(path)
    if not path.is_file():
        raise InputError(path, "not a regular file or a folder of frames")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    suffix = path.suffix.lower()
    if suffix in AV_SUFFIXES:
        return _load_av(path)
    try:
        return _load_pillow(path)
    except InputError:
        if suffix in PILLOW_SUFFIXES:
            raise
        # An unknown suffix Pillow cannot read: perhaps a video container FFmpeg knows.
        return _load_av(path)


# -- frame folders -----------------------------------------------------------------------------------
def _load_folder(folder: Path) -> VideoClip:
    files = [p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and not p.name.startswith(".")]
    if not files:
        raise InputError(folder, f"empty frame folder: no frame files ({', '.join(FRAME_SUFFIXES)})")
    numbered: dict[int, Path] = {}
    for file in files:
        numbers = _NUMBER.findall(file.stem)
        if not numbers:
            raise InputError(file, "frame file name has no frame number (name frames like frame_0001.png)")
        number = int(numbers[-1])
        if number in numbered:
            raise InputError(file, f"frame number {number} also used by {numbered[number].name}: the order is ambiguous")
        numbered[number] = file
    ordered = [numbered[n] for n in sorted(numbered)]
    size = None
    for file in ordered:
        frame_size = _header_size(file)
        if size is None:
            size = frame_size
        elif frame_size != size:
            raise InputError(file, f"frame is {frame_size[0]}x{frame_size[1]} but {ordered[0].name} is "
                                   f"{size[0]}x{size[1]}: all frames of a video have one size")
    assert size is not None
    if len(ordered) * size[0] * size[1] > MAX_CLIP_PIXELS:
        raise InputError(folder, f"clip too large ({len(ordered)} frames of {size[0]}x{size[1]}), refusing to decode")
    return VideoClip(path=str(folder), kind="frames", num_frames=len(ordered),
                     frame_files=tuple(str(p) for p in ordered))


def _header_size(file: Path) -> tuple[int, int]:
    if not file.is_file():
        raise InputError(file, "frame is not a regular file")
    if file.stat().st_size == 0:
        raise InputError(file, "empty frame file (0 bytes)")
    try:
        with Image.open(file) as img:
            size = img.size
    except Image.UnidentifiedImageError:
        raise InputError(file, "not a readable image (unknown or corrupt format)") from None
    except Exception as exc:
        raise InputError(file, f"unreadable frame: {decode_problem(exc)}") from None
    if size[0] <= 0 or size[1] <= 0:
        raise InputError(file, f"zero-size frame ({size[0]}x{size[1]})")
    return size


def _decode_image(file: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as img:
                img.load()
                return _to_rgb(img)
    except FileNotFoundError:
        raise InputError(file, "frame file not found (removed after the video was checked?)") from None
    except Exception as exc:  # truncated / corrupt bytes: Pillow raises OSError, SyntaxError, ...
        raise InputError(file, f"corrupt or truncated frame: {decode_problem(exc)}") from None


# -- animated images (Pillow) ------------------------------------------------------------------------
def _load_pillow(path: Path) -> VideoClip:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width <= 0 or height <= 0:
                    raise InputError(path, f"zero-size video ({width}x{height})")
                count = int(getattr(img, "n_frames", 1))
                if count * width * height > MAX_CLIP_PIXELS:
                    raise InputError(path, f"clip too large ({count} frames of {width}x{height}), refusing to decode")
                # Decode every frame now: a truncated or corrupt file is refused here, not mid-training.
                for index in range(count):
                    img.seek(index)
                    img.load()
    except InputError:
        raise
    except Image.UnidentifiedImageError:
        raise InputError(path, "not a readable video or animated image (unknown or corrupt format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(path, f"video too large, refusing to decode (decompression bomb?): {exc}") from None
    except Exception as exc:
        raise InputError(path, f"corrupt or truncated video: {decode_problem(exc)}") from None
    return VideoClip(path=str(path), kind="pillow", num_frames=count)


def _read_pillow(path: Path, indices: Sequence[int]) -> list[Image.Image]:
    try:
        with Image.open(path) as img:
            frames = []
            for index in indices:
                img.seek(index)
                img.load()
                frames.append(_to_rgb(img))
            return frames
    except FileNotFoundError:
        raise InputError(path, "file not found (removed after it was checked?)") from None
    except Exception as exc:
        raise InputError(path, f"corrupt or truncated video: {decode_problem(exc)}") from None


# -- video files (PyAV) ------------------------------------------------------------------------------
def _av():
    try:
        import av
    except ImportError:
        return None
    return av


def _load_av(path: Path) -> VideoClip:
    av = _av()
    if av is None:
        raise InputError(path, "decoding video files needs PyAV (pip install av); frame folders and "
                               "animated GIFs need nothing more")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(path, "no video stream in the file")
            stream = container.streams.video[0]
            # Count frames by demuxing (cheap: no decoding); the header's count is often missing or wrong.
            pts = [packet.pts for packet in container.demux(stream) if packet.size]
            count = len(pts)
            # Presentation times in display order, to seek to a sampled frame instead of decoding up to it.
            frame_pts = tuple(sorted(pts)) if None not in pts and len(set(pts)) == count else ()
        if count == 0:
            raise InputError(path, "the video stream holds no frames")
        with av.open(str(path)) as container:
            first = next(container.decode(video=0), None)
            if first is None:
                raise InputError(path, "no frame of the video stream could be decoded")
            width, height = first.width, first.height
        if width <= 0 or height <= 0:
            raise InputError(path, f"zero-size video ({width}x{height})")
        if count * width * height > MAX_CLIP_PIXELS:
            raise InputError(path, f"clip too large ({count} frames of {width}x{height}), refusing to decode")
    except InputError:
        raise
    except Exception as exc:  # av.error.FFmpegError and its subclasses, EOFError, ...
        raise InputError(path, f"not a readable video: {decode_problem(exc)}") from None
    return VideoClip(path=str(path), kind="av", num_frames=count, frame_pts=frame_pts)


def _seek_av(path: Path, indices: Sequence[int], frame_pts: Sequence[int]) -> list[Image.Image] | None:
    """The frames at ``indices``, each reached by seeking to the keyframe before it and decoding
    forward (at most a group of pictures per sampled frame, not the whole video). ``None`` when the
    container does not seek exactly (the caller then decodes from the start)."""
    av = _av()
    if av is None:
        return None
    frames = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            for index in indices:
                target = frame_pts[index]
                container.seek(target, stream=stream, backward=True, any_frame=False)
                found = None
                for frame in container.decode(stream):
                    if frame.pts is None or frame.pts > target:
                        return None  # landed after the frame, or no timestamps: not exact
                    if frame.pts == target:
                        found = frame.to_image().convert("RGB")
                        break
                if found is None:
                    return None
                frames.append(found)
    except Exception:  # a container that cannot seek: decode from the start instead
        return None
    return frames


def _read_av(path: Path, indices: Sequence[int], expected: int) -> list[Image.Image]:
    av = _av()
    if av is None:
        raise InputError(path, "decoding video files needs PyAV (pip install av)")
    wanted = {index: slot for slot, index in enumerate(indices)}
    frames: list[Image.Image | None] = [None] * len(indices)
    decoded = 0
    try:
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                decoded = index + 1
                if index in wanted:
                    frames[wanted[index]] = frame.to_image().convert("RGB")
                if index >= max(indices):
                    break
    except FileNotFoundError:
        raise InputError(path, "file not found (removed after it was checked?)") from None
    except Exception as exc:
        raise InputError(path, f"corrupt video: {decode_problem(exc)}") from None
    if any(f is None for f in frames):
        # Fewer decodable frames than packets (a codec's trailing packets, a damaged tail): the
        # clip is sampled again over the frames that really decode, so it still spans the whole video.
        if decoded == 0:
            raise InputError(path, "no frame of the video stream could be decoded")
        if decoded >= expected:  # pragma: no cover - cannot happen: every index < expected was reached
            raise InputError(path, "frames went missing while decoding")
        return _read_av(path, sample_indices(decoded, len(indices)), decoded)
    return frames  # type: ignore[return-value]

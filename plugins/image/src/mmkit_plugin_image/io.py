"""Decode and validate one image file.

Every failure becomes :class:`mmkit.errors.InputError` naming the file, so a bad image in a dataset
of millions is reported as "path: reason" rather than a traceback from deep inside Pillow.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from mmkit import InputError

#: Modes holding more than 8 bits per sample; ``Image.convert("RGB")`` would clip them to 255.
_WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open any Pillow-readable image, decode it fully and return it as an RGB image.

    Raises :class:`~mmkit.errors.InputError` for a missing path, a non-file, an empty file, bytes
    Pillow cannot decode (corrupt or truncated), a zero-size image and a decompression bomb (more
    than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if not path.is_file():
        raise InputError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    try:
        # Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS; a huge image is an error here either
        # way, before the pixels are decoded.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width <= 0 or img.height <= 0:
                    raise InputError(path, f"zero-size image ({img.width}x{img.height})")
                # load() decodes every byte now, so truncation shows up here and not in a worker later.
                img.load()
                rgb = _to_rgb(img)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(path, f"image too large, refusing to decode (decompression bomb?): {exc}") from None
    except Image.UnidentifiedImageError:
        raise InputError(path, "not a readable image (unknown or corrupt format)") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, ... on bad bytes
        raise InputError(path, f"corrupt or truncated image: {decode_problem(exc)}") from None
    return rgb


def decode_problem(exc: BaseException) -> str:
    """Why a decoder gave up, in words for the person who owns the file. Pillow's and PyAV's own
    messages are kept where they are written for people (``OSError`` / ``ValueError``: "image file is
    truncated (3 bytes not processed)"); an ``IndexError``, ``EOFError`` or ``SyntaxError`` from inside
    a decoder says nothing about the file but that it ended early or is damaged."""
    message = str(exc).strip()
    if isinstance(exc, (OSError, ValueError)) and message:
        return message
    return "the data ends early or is damaged"


def _to_rgb(img: Image.Image) -> Image.Image:
    """An RGB copy of ``img``, shown the way image viewers show it."""
    # Phones store rotation in EXIF; apply it so the pixels match what a person labelled.
    img = ImageOps.exif_transpose(img) or img
    if img.mode in _WIDE_INT_MODES:
        # 16-bit greyscale: rescale to 8 bits instead of clipping everything above 255 to white.
        img = _grey8(np.asarray(img, dtype=np.float64) / 257.0)
    elif img.mode == "F":
        img = _grey8(np.asarray(img, dtype=np.float64))
    elif img.mode == "P" and "transparency" in img.info:
        # Going through RGBA avoids Pillow's palette-transparency warning; alpha is then dropped as
        # LLaVA / CLIP preprocessing do.
        img = img.convert("RGBA")
    return img.convert("RGB")


def _grey8(values: np.ndarray) -> Image.Image:
    """An "L" image from float grey values, rounded and clipped to 0..255."""
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))

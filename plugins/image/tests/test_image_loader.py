"""``load_image`` beyond the contract: modes, EXIF rotation, size limits, error messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from image_files import gradient, write_image
from PIL import Image

from mmkit.errors import InputError
from mmkit_plugin_image.io import load_image


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".gif", ".webp", ".tiff"])
def test_common_formats_load_as_rgb(tmp_path: Path, suffix: str) -> None:
    path = write_image(tmp_path / f"img{suffix}", gradient(20, 30))
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (30, 20)


def test_accepts_str_paths_and_returns_a_decoded_copy(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.png", gradient())
    img = load_image(str(path))
    path.unlink()  # the image must not depend on the file any more
    assert np.array_equal(np.asarray(img), gradient())


def test_greyscale_and_alpha_become_rgb(tmp_path: Path) -> None:
    grey = write_image(tmp_path / "grey.png", np.full((4, 5), 200, np.uint8))
    assert np.asarray(load_image(grey)).tolist() == np.full((4, 5, 3), 200).tolist()
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 90, 128
    out = np.asarray(load_image(write_image(tmp_path / "rgba.png", rgba)))
    assert out.shape == (4, 5, 3) and (out[..., 0] == 90).all()


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.fromarray(gradient(8, 8)).convert("P")
    img.info["transparency"] = 0
    path = tmp_path / "pal.png"
    img.save(path, transparency=0)
    assert load_image(path).mode == "RGB"


def test_16_bit_greyscale_is_rescaled_not_clipped(tmp_path: Path) -> None:
    pixels = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(pixels).save(path)
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 100, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "phone.jpg"
    Image.fromarray(gradient(20, 40)).save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_animated_gif_gives_the_first_frame(tmp_path: Path) -> None:
    frames = [Image.fromarray(np.full((6, 6, 3), v, np.uint8)) for v in (0, 255)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert np.asarray(load_image(path)).max() == 0


@pytest.mark.parametrize("limit", [100, 200])  # 2x over (Pillow's error) and 1-2x over (its warning)
def test_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    path = write_image(tmp_path / "big.png", gradient(16, 16))  # 256 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(InputError, match="decompression bomb") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_zero_size_image_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow itself rejects 0-pixel headers of the formats it writes; a plugin format might not.
    path = write_image(tmp_path / "ok.png", gradient())
    monkeypatch.setattr(Image, "open", lambda *_a, **_k: Image.new("RGB", (0, 7)))
    with pytest.raises(InputError, match="zero-size") as info:
        load_image(path)
    assert info.value.path == str(path)


@pytest.mark.parametrize("cut", [0.25, 0.9])
def test_truncated_jpeg(tmp_path: Path, cut: float) -> None:
    data = write_image(tmp_path / "full.jpg", gradient(64, 64)).read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(InputError, match=r"truncated|corrupt"):
        load_image(path)


def test_error_reasons_are_specific(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="not a regular file"):
        load_image(tmp_path)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        load_image(tmp_path / "empty.jpg")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(InputError, match="not a readable image"):
        load_image(tmp_path / "text.png")

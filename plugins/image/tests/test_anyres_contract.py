"""mmkit's modality contract, run against the ``image`` modality with ``anyres: true`` (a variable-size
encoder: token counts announced before encoding, mixed-size batches, blank, bf16 forward)."""

from __future__ import annotations

from pathlib import Path

import pytest
from image_files import gradient, write_image

from mmkit.testing import ModalityContract
from mmkit_plugin_image.plugin import TINY_CLIP


class TestImageAnyresContract(ModalityContract):
    modality = "image"
    encoder_options = {**TINY_CLIP, "anyres": True, "anyres_pool": 2}

    def make_valid_files(self, tmp_path: Path) -> list[Path]:
        # Three aspect ratios: wide, tall and square grids give three different token counts.
        return [
            write_image(tmp_path / "wide.png", gradient(32, 64)),
            write_image(tmp_path / "tall.jpg", gradient(48, 16, flip=True), quality=90),
            write_image(tmp_path / "square.png", gradient(40, 40)),
        ]

    def make_invalid_files(self, tmp_path: Path) -> dict[str, Path]:
        empty = tmp_path / "empty.png"
        empty.write_bytes(b"")
        text = tmp_path / "notes.jpg"
        text.write_text("this is a text file, not a JPEG\n")
        return {"zero-byte file": empty, "text file named .jpg": text}

    # Encoder-independent checks (registration, lazy references, torch-free import, the loader's errors,
    # the demo) already run in test_image_contract.py; here only the encoder differs.
    def test_registered_and_consistent(self, host, spec):
        pytest.skip("encoder-independent: run by TestImageContract")

    def test_lazy_references_resolve(self, host):
        pytest.skip("encoder-independent: run by TestImageContract")

    def test_plugin_import_does_not_import_torch(self, host):
        pytest.skip("encoder-independent: run by TestImageContract")

    def test_demo_task_builds(self, host, spec, tmp_path):
        pytest.skip("encoder-independent: run by TestImageContract")

"""The image demo task: "What digit is shown?" on the UCI handwritten digits.

The 1797 8x8 digits ship with the package (``data/digits.csv.gz``, CC BY 4.0, see
``data/ATTRIBUTION.md``), so the demo runs offline and in about a second.
"""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmkit import DemoTask

ANSWERS = tuple(str(d) for d in range(10))
TEST_PER_CLASS = 30  # 300 held-out images, 30 of each digit
IMAGE_DIR = "digits"
# A few wordings so the model learns to read the image, not one fixed string.
QUESTIONS = (
    "What digit is shown?",
    "Which digit is in this image?",
    "What number is written here? Answer with one digit.",
    "Read the handwritten digit.",
    "Which of 0-9 is this?",
)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits as ``uint8 [1797, 8, 8]`` pixel values 0..16 and ``int64 [1797]`` labels."""
    with resources.files("mmkit_plugin_image").joinpath("data/digits.csv.gz").open("rb") as raw:
        with gzip.open(raw, "rt") as text:
            table = np.loadtxt(text, delimiter=",", dtype=np.int64)
    return table[:, :64].reshape(-1, 8, 8).astype(np.uint8), table[:, 64]


def build_demo(root: Path, *, seed: int) -> DemoTask:
    """Write every digit as an 8x8 RGB PNG under ``root/digits/`` and return the split records.

    The files do not depend on ``seed``; the split and the question wording do.
    """
    root = Path(root)
    images, labels = load_digits()
    folder = root / IMAGE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    rel_paths = []
    for i, pixels in enumerate(images):
        rel = f"{IMAGE_DIR}/digit-{i:04d}.png"
        # 0..16 "on pixel" counts -> 0..255 grey, stored as RGB like any photo the plugin reads.
        grey = np.rint(pixels.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(grey).convert("RGB").save(root / rel, format="PNG")
        rel_paths.append(rel)

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    # Class-balanced test set: the first TEST_PER_CLASS images of each digit in shuffled order.
    taken = {d: 0 for d in range(10)}
    test_idx, train_idx = [], []
    for i in order:
        label = int(labels[i])
        if taken[label] < TEST_PER_CLASS:
            taken[label] += 1
            test_idx.append(int(i))
        else:
            train_idx.append(int(i))
    questions = rng.integers(len(QUESTIONS), size=len(labels))

    def record(i: int) -> dict[str, Any]:
        return {
            "id": f"digit-{i:04d}",
            "image": rel_paths[i],
            "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTIONS[questions[i]]}"},
                {"from": "gpt", "value": str(int(labels[i]))},
            ],
        }

    return DemoTask(
        train=[record(i) for i in train_idx],
        test=[record(i) for i in test_idx],
        answers=ANSWERS,
        metric="accuracy",
    )

"""The offline demo: "What shape is this?" over procedurally generated point clouds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mmkit import DemoTask
from mmkit_plugin_pointcloud.io import save_point_cloud
from mmkit_plugin_pointcloud.shapes import SHAPES, sample_shape

QUESTIONS = (
    "What shape is this?",
    "Which solid does this point cloud show?",
    "Name the shape of this object in one word.",
    "What geometric shape is represented by these points?",
)
TRAIN_PER_CLASS = 300
TEST_PER_CLASS = 30
MIN_POINTS, MAX_POINTS = 192, 512  # around the demo encoder's 256: exercises both FPS and repetition


def build_demo(root: Path, *, seed: int) -> DemoTask:
    """Write ``(TRAIN_PER_CLASS + TEST_PER_CLASS) x 5`` clouds under ``root`` and return the records.

    Mostly ``.npy`` (as LAMM); every 10th file is a binary ``.ply`` and every 25th an ``.xyz`` so the
    other readers run too. Classes are interleaved so both splits are balanced.
    """
    root = Path(root)
    (root / "clouds").mkdir(parents=True, exist_ok=True)
    names = list(SHAPES)
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    counter = 0
    for split, per_class, stream in (("train", TRAIN_PER_CLASS, 0), ("test", TEST_PER_CLASS, 1)):
        rng = np.random.default_rng([seed, stream])  # independent streams: test never repeats train
        for i in range(per_class * len(names)):
            label = names[i % len(names)]
            counter += 1
            points = sample_shape(label, rng, int(rng.integers(MIN_POINTS, MAX_POINTS + 1)))
            suffix = ".ply" if counter % 10 == 0 else ".xyz" if counter % 25 == 0 else ".npy"
            rel = f"clouds/{split}-{counter:04d}{suffix}"
            save_point_cloud(root / rel, points)
            question = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
            splits[split].append({
                "id": f"shape-{counter:04d}",
                "pointcloud": rel,
                "conversations": [
                    {"from": "human", "value": f"<pointcloud>\n{question}"},
                    {"from": "gpt", "value": label},
                ],
            })
    return DemoTask(train=splits["train"], test=splits["test"], answers=tuple(names))

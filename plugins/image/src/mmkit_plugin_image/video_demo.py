"""The video demo task: "Which way does it move?" about short generated clips of a moving square.

Each clip has 3 to 8 frames (so its token count differs from clip to clip); a square of random size
and colour crosses a dark frame left, right, up or down at a steady speed from a random start.
Every clip is generated from the seed, offline, in about a second, and written as an animated GIF
(read by Pillow, so every install reads the demo; ``save_frame_folder`` writes the other format every
install reads, a folder of numbered PNG frames). The path is drawn first and the direction picks
which end it starts from, so every position is as likely for either direction; one frame still hints
(a path that stays inside the frame ends nearer the side it moves to: the trained demo reads the last
frame alone right 0.61 of the time, chance 0.25), the order of the frames gives the answer (first and
last frames 0.88, the whole clip 1.00).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmkit import DemoTask

ANSWERS = ("left", "right", "up", "down")
#: (dx, dy) per frame for each answer, image rows growing downwards.
STEPS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
FRAME_SIZE = 16  # pixels; the demo encoder reads frames at this size, so nothing is resampled
MIN_FRAMES, MAX_FRAMES = 3, 8
MIN_TRAVEL = 5  # pixels the square moves from the first frame to the last, at least
TRAIN_PER_CLASS, TEST_PER_CLASS = 200, 50  # 800 training clips, 200 held out
CLIP_DIR = "clips"
QUESTIONS = (
    "Which way does it move?",
    "Which way is the square moving?",
    "In which direction does the shape move?",
    "Where is it going: left, right, up or down?",
)


def make_clip(direction: str, rng: np.random.Generator, *, size: int = FRAME_SIZE) -> np.ndarray:
    """A ``uint8 [frames, size, size, 3]`` clip of a square moving one way at a steady speed."""
    frames = int(rng.integers(MIN_FRAMES, MAX_FRAMES + 1))
    side = int(rng.integers(3, 6))
    room = size - side  # top-left corner positions 0..room keep the square inside the frame
    # The fastest and slowest whole-pixel speeds that move it MIN_TRAVEL..room pixels in all.
    slow = -(-MIN_TRAVEL // (frames - 1))
    fast = max(slow, room // (frames - 1))
    speed = int(rng.integers(slow, fast + 1))
    travel = speed * (frames - 1)
    dx, dy = STEPS[direction]
    # Start anywhere the whole path stays inside; the other coordinate is anywhere.
    along = int(rng.integers(0, room - travel + 1))
    across = int(rng.integers(0, room + 1))
    if (dx or dy) < 0:  # left / up: start at the far end of the path
        along += travel
    background = rng.integers(0, 60, size=3)
    colour = rng.integers(150, 256, size=3)
    clip = np.empty((frames, size, size, 3), dtype=np.uint8)
    clip[:] = background
    for t in range(frames):
        pos = along + t * speed * (dx or dy)
        x, y = (pos, across) if dx else (across, pos)
        clip[t, y:y + side, x:x + side] = colour
    return clip


def save_gif(clip: np.ndarray, path: Path) -> Path:
    frames = [Image.fromarray(f) for f in clip]
    # disposal 1 with full frames: every frame is stored whole; loop 0 = repeat, as viewers expect.
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=200, loop=0, disposal=1, optimize=False)
    return path


def save_frame_folder(clip: np.ndarray, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for t, frame in enumerate(clip):
        Image.fromarray(frame).save(folder / f"frame_{t + 1:03d}.png", format="PNG")
    return folder


def build_demo(root: Path, *, seed: int) -> DemoTask:
    """Write the clips under ``root/clips/`` and return the split records (all from ``seed``)."""
    root = Path(root)
    (root / CLIP_DIR).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_class = TRAIN_PER_CLASS + TEST_PER_CLASS
    labels = rng.permutation(np.repeat(np.arange(len(ANSWERS)), per_class))
    seen = {a: 0 for a in range(len(ANSWERS))}
    train: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    for i, label in enumerate(labels.tolist()):
        direction = ANSWERS[label]
        clip = make_clip(direction, rng)
        rel = f"{CLIP_DIR}/clip-{i:04d}.gif"
        save_gif(clip, root / rel)
        record = {
            "id": f"clip-{i:04d}",
            "video": rel,
            "conversations": [
                {"from": "human", "value": f"<video>\n{QUESTIONS[int(rng.integers(len(QUESTIONS)))]}"},
                {"from": "gpt", "value": direction},
            ],
        }
        # The first TEST_PER_CLASS clips of each direction (in shuffled order) are held out.
        (test if seen[label] < TEST_PER_CLASS else train).append(record)
        seen[label] += 1
    return DemoTask(train=train, test=test, answers=ANSWERS, metric="accuracy")

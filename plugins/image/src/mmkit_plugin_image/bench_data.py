"""Generated benchmark data for the image recipes: small synthetic images written as LAMM-Bench
meta files (a JSON list of records with ``image``, ``query`` and the task's answer fields), so the
counting and locating recipes run offline with LAMM's own field names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SIZE = 32  # pixels per side
SQUARE = 5  # side of a square, pixels


def _place(rng: np.random.Generator, count: int) -> list[tuple[int, int]]:
    """Top-left corners of ``count`` squares that neither overlap nor touch."""
    corners: list[tuple[int, int]] = []
    while len(corners) < count:
        x, y = (int(v) for v in rng.integers(0, SIZE - SQUARE + 1, size=2))
        if all(abs(x - cx) > SQUARE or abs(y - cy) > SQUARE for cx, cy in corners):
            corners.append((x, y))
    return corners


def _write(root: Path, name: str, index: int, corners: list[tuple[int, int]]) -> str:
    pixels = np.zeros((SIZE, SIZE), dtype=np.uint8)
    for x, y in corners:
        pixels[y:y + SQUARE, x:x + SQUARE] = 255
    rel = f"{name}/{name}-{index:04d}.png"
    (root / name).mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert("RGB").save(root / rel, format="PNG")
    return rel


def _dump(root: Path, name: str, records: list[dict[str, Any]]) -> Path:
    path = root / f"{name}.json"
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def counting(root: Path, *, size: int, seed: int) -> Path:
    """``size`` images with 1-5 squares; fields ``image``, ``query``, ``num`` (as FSC147's)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(size):
        count = 1 + i % 5
        records.append({"id": f"count-{i:04d}", "image": _write(root, "count", i, _place(rng, count)),
                        "query": "How many white squares are in this image? Answer with a number.", "num": count})
    return _dump(root, "counting", records)


def locating(root: Path, *, size: int, seed: int) -> Path:
    """``size`` images with one square; ``bbox`` is its box normalised to 0-1 (LAMM's convention),
    ``object`` the same as a detection list."""
    rng = np.random.default_rng([seed, 1])
    records = []
    for i in range(size):
        (x, y), = _place(rng, 1)
        bbox = [round(v / SIZE, 4) for v in (x, y, x + SQUARE, y + SQUARE)]
        records.append({"id": f"locate-{i:04d}", "image": _write(root, "locate", i, [(x, y)]),
                        "query": "Where is the white square? Answer with its box [x1, y1, x2, y2].",
                        "bbox": bbox, "object": [{"label": "square", "bbox": bbox}]})
    return _dump(root, "locating", records)

"""The demo task: "Is this graph a ring or a star?" over graphs of 4 to 9 nodes (one token per node,
so the prompt length follows the graph). Node features are noise around one value, so the answer is
in the structure, which a frozen random GIN's sum aggregation keeps (a star's centre has degree n-1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from mmkit import DemoTask

from mmkit_plugin_graph_gin.io import write_graph

TRAIN_PER_CLASS, TEST_PER_CLASS = 60, 20
QUESTIONS = ("<graph>\nIs this graph a ring or a star?", "Which shape is this graph, ring or star?\n<graph>")


def make_graph(kind: str, nodes: int, rng: np.random.Generator, features: int = 4) -> tuple[np.ndarray, np.ndarray]:
    if kind == "ring":
        pairs = [(i, (i + 1) % nodes) for i in range(nodes)]
    else:
        pairs = [(0, i) for i in range(1, nodes)]
    edges = np.array(pairs + [(b, a) for a, b in pairs], dtype=np.int64).T  # undirected: both directions
    x = (1.0 + 0.1 * rng.normal(size=(nodes, features))).astype(np.float32)
    return x, edges


def build_demo(root: Path, *, seed: int) -> DemoTask:
    root = Path(root)
    (root / "graphs").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for i in range(per_class):
            for kind in ("ring", "star"):
                gid = f"{split}-{kind}-{i:03d}"
                relative = f"graphs/{gid}.json"
                write_graph(root / relative, *make_graph(kind, int(rng.integers(4, 10)), rng))
                question = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
                splits[split].append({"id": gid, "graph": relative, "conversations": [
                    {"from": "human", "value": question}, {"from": "gpt", "value": kind}]})
    return DemoTask(train=splits["train"], test=splits["test"], answers=("ring", "star"))

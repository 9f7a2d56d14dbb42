"""Graph files: JSON ``{"x": [[f, ...] per node], "edge_index": [[sources], [targets]]}``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from mmkit import InputError

#: Larger graphs are refused before they are built (a corrupt file must not exhaust memory).
MAX_NODES = 10_000


def load_graph(path: Path) -> dict[str, np.ndarray]:
    """``{"x": float32 [n, features], "edge_index": int64 [2, edges]}``; every fault is an InputError."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(str(path), "file not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(str(path), f"not a JSON graph: {exc}") from None
    if not isinstance(data, dict) or "x" not in data or "edge_index" not in data:
        raise InputError(str(path), 'expected a JSON object with "x" (node features) and "edge_index"')
    try:
        x = np.asarray(data["x"], dtype=np.float32)
        edges = np.asarray(data["edge_index"], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(str(path), f"x / edge_index are not numeric arrays: {exc}") from None
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(str(path), f"x must be [nodes, features] with at least one node, got shape {list(x.shape)}")
    if x.shape[0] > MAX_NODES:
        raise InputError(str(path), f"{x.shape[0]} nodes, over the limit of {MAX_NODES}")
    if not np.isfinite(x).all():
        raise InputError(str(path), "x holds NaN or infinite values")
    if edges.size == 0:
        edges = edges.reshape(2, 0)
    if edges.ndim != 2 or edges.shape[0] != 2:
        raise InputError(str(path), f"edge_index must be [2, edges], got shape {list(edges.shape)}")
    if not np.isfinite(edges).all() or (edges != np.round(edges)).any():
        raise InputError(str(path), "edge_index holds non-integer node numbers")
    if edges.size and (edges.min() < 0 or edges.max() >= x.shape[0]):
        raise InputError(str(path), f"edge_index names node {int(edges.max() if edges.max() >= x.shape[0] else edges.min())}"
                                    f" of a graph of {x.shape[0]} nodes")
    return {"x": x, "edge_index": edges.astype(np.int64)}


def write_graph(path: Path, x: Any, edge_index: Any) -> Path:
    path = Path(path)
    path.write_text(json.dumps({"x": np.asarray(x).tolist(), "edge_index": np.asarray(edge_index).tolist()}))
    return path

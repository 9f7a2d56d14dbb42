"""Each process's RNG states (python, numpy, torch, CUDA), saved to and restored from safetensors
(tensors plus string metadata: no pickle)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from mmkit.atomic import default_mode
from mmkit.training.faults import inject_save_fault


def rng_state() -> tuple[dict[str, Any], dict[str, str]]:
    """This process's RNG states as tensors plus string metadata (safetensors, no pickle)."""
    import numpy as np
    import torch

    tensors: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, py_gauss = random.getstate()
    meta = {"python": json.dumps([version, list(internal), py_gauss]),
            "numpy": json.dumps([kind, int(pos), int(has_gauss), float(gauss)])}
    return tensors, meta


def set_rng_state(tensors: dict[str, Any], meta: dict[str, str]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(tensors["torch"])
    cuda = sorted(k for k in tensors if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        states = [tensors[k] for k in cuda][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)
    kind, pos, has_gauss, gauss = json.loads(meta["numpy"])
    np.random.set_state((kind, tensors["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = json.loads(meta["python"])
    random.setstate((version, tuple(internal), py_gauss))


def _rng_file(directory: Path, rank: int) -> Path:
    return directory / "rng" / f"rank-{rank:05d}.safetensors"


def write_rng(directory: Path, rank: int, step: int) -> None:
    from safetensors.torch import save_file

    inject_save_fault(step, rank)  # (drills) for processes that DeepSpeed had nothing to write for
    path = _rng_file(directory, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, meta = rng_state()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    os.chmod(path, default_mode())  # safetensors writes 0600; files of a run are read by the group


def load_rng(checkpoint: Path, rank: int) -> bool:
    """Restore this process's RNG states; ``False`` when the checkpoint has none for this rank."""
    from safetensors import safe_open

    path = _rng_file(checkpoint, rank)
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    set_rng_state(tensors, meta)
    return True


def seed_fresh(seed: int, rank: int, step: int) -> None:
    """A fresh, reproducible stream for a process the checkpoint had no RNG state for (more processes now)."""
    import numpy as np
    import torch

    derived = (seed * 1_000_003 + rank * 7919 + step) % 2**32
    torch.manual_seed(derived)
    np.random.seed(derived)
    random.seed(derived)

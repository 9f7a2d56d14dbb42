"""Where things are in a checkpoint directory, and the trainer state it records.

Layout::

    OUTPUT_DIR/checkpoints/
        step-00000040/
            model/             trainable weights gathered from every ZeRO partition, in the same
                               format as OUTPUT_DIR/model (``mmkit.load`` / ``mmkit eval`` read it)
            deepspeed/         DeepSpeed's own checkpoint (``engine.save_checkpoint``): optimizer
                               state (per process under ZeRO), LR scheduler, step counters
            rng/rank-NNNNN.safetensors   python, numpy, torch (and CUDA) RNG states of each process
            trainer_state.json data position (epoch, step in epoch), counters, batch geometry, the
                               run's configuration and the trainable parameters' names and shapes
            manifest.json      sha256 and size of every file above; written last
        latest                 name of the newest checkpoint (for people and tools)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import attrs

from mmkit.errors import CheckpointMismatchError


FORMAT = 1
CHECKPOINTS = "checkpoints"
STATE = "trainer_state.json"
MANIFEST = "manifest.json"
DS_TAG = "deepspeed"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@attrs.define
class TrainState:
    """Where training is: optimizer steps done, and the data position within the epoch."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens: int = 0
    nonfinite_steps: int = 0


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (those with a manifest), newest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / MANIFEST).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found, reverse=True)]


def json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, (tuple, set)) else repr(v)))


def read_state(checkpoint: Path) -> dict[str, Any]:
    state = json.loads((checkpoint / STATE).read_text(encoding="utf-8"))
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f"{checkpoint / STATE}: expected a JSON object, found a {type(state).__name__}")
    return state


def remove_dir(path: Path) -> None:
    """Delete a directory so that no half-deleted checkpoint can ever be mistaken for one: rename it
    to a hidden name first."""
    if not path.exists():
        return
    doomed = path.with_name(f".{path.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def discard_checkpoints(output_dir: Path) -> int:
    """Remove the checkpoints of an earlier run (``resume: never``); returns how many."""
    found = list_checkpoints(output_dir)
    for path in found:
        remove_dir(path)
    (checkpoint_root(output_dir) / LATEST).unlink(missing_ok=True)
    return len(found)

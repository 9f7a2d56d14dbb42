"""The records a run left out under ``--skip-bad-records``, gathered over processes and written
to ``RUN/skipped.jsonl``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from mmkit.data.batching import Skipped
from mmkit.training.distributed import all_gather_objects


def skipped_records(*groups: Sequence[Skipped], world: int = 1) -> list[dict[str, str]]:
    """Every distinct skipped record (``where``, ``reason``) of ``groups``, over all processes
    (a collective call when ``world`` > 1: every rank must make it), in a stable order."""
    found = {s.where: s.reason for group in groups for s in group}
    if world > 1:
        for part in all_gather_objects(sorted(found.items())):
            found.update(dict(part))
    return [{"record": where, "reason": reason} for where, reason in sorted(found.items())]


def write_skipped(path: Path, records: Sequence[dict[str, str]]) -> Path:
    """``skipped.jsonl``: one line per record left out under ``--skip-bad-records``, naming the
    record (file, index, id) and why. Written whole into a temporary file, then renamed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    os.replace(tmp, path)
    return path

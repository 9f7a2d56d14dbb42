"""Where mmkit keeps what it builds or measures once per machine (the ``--llm tiny`` model, the
bench's matmul peak): ``$MMKIT_CACHE``, else ``$XDG_CACHE_HOME/mmkit``, else ``~/.cache/mmkit``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    explicit = os.environ.get("MMKIT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mmkit"

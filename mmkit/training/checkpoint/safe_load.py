"""Loading DeepSpeed's ``torch.save`` files without running code from them.

A manifest detects corruption, not tampering, so DeepSpeed's files are loaded with
``weights_only=True`` (tensors, containers and an allow-list of the few plain DeepSpeed types it
stores): a file that needs full unpickling, which could run code, is refused unless
``--trust-checkpoint``.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from typing import Any

from mmkit.errors import CheckpointMismatchError


#: The plain DeepSpeed types its checkpoints hold besides tensors and containers (an enum, a named
#: tuple and the loss scalers' attribute bags): allowed when loading with ``weights_only=True``.
SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.utils.tensor_fragment:fragment_address",
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
)


def _safe_globals() -> list[Any]:
    import importlib

    found = []
    for spec in SAFE_GLOBALS:
        module, _, name = spec.partition(":")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # another DeepSpeed version: that type cannot be in its checkpoints
    return found


@contextlib.contextmanager
def safe_torch_load(*, trust: bool = False):
    """While active, every ``torch.load`` (DeepSpeed asks for ``weights_only=False``) loads with
    ``weights_only=True`` and the :data:`SAFE_GLOBALS` allow-list; a file that needs anything else
    raises :class:`CheckpointMismatchError` before any of its code can run. ``trust``: load fully
    (``--trust-checkpoint``)."""
    import torch

    original = torch.load
    allowed = _safe_globals()

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        if trust:
            kwargs["weights_only"] = False
            return original(f, *args, **kwargs)
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            match = re.search(r"(?:Unsupported global: GLOBAL|Unsupported operand|Unsupported class) ?([^\s]+)?",
                              str(exc))
            holds = f" (it holds {match.group(1)})" if match and match.group(1) else ""
            raise CheckpointMismatchError(
                f"{f}: loading it needs full unpickling, which can run code stored in the file{holds}; mmkit loads "
                "optimizer state only as tensors and known DeepSpeed types. If you wrote this checkpoint yourself "
                "and trust it, pass --trust-checkpoint") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original

"""Training metrics to a JSONL file and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def batch_slots(batch: Any) -> int:
    """Token positions a micro-batch computes on, padding included (its real tokens are ``num_tokens``)."""
    return int(batch.num_slots)


def window_rates(tokens: float, slots: float, seconds: float) -> dict[str, float]:
    """A log window's figures from its sums: tokens/s is the window's tokens over its wall time
    (not a mean of per-step rates, which over-weights fast steps) and the padding fraction is over
    every micro-batch of the window (not the last one)."""
    return {"tokens_per_s": tokens / max(seconds, 1e-9),
            "padding_fraction": 1.0 - tokens / slots if slots else float("nan")}


class MetricsLog:
    def __init__(self, output_dir: Path, *, tensorboard: bool, enabled: bool = True):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self._fh = open(self.path, "a", encoding="utf-8") if enabled else None
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._fh.write(json.dumps({"step": step, **values}) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self._tb is not None:
            self._tb.close()

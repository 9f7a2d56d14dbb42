"""Repeated measurements and their statistics: every figure is a median over rounds with its
min-max, in items per second (never calls per second)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs


@attrs.frozen
class Stat:
    """One figure measured ``len(values)`` times."""

    values: tuple[float, ...] = attrs.field(converter=tuple)
    unit: str = ""
    #: a larger value is an improvement (throughputs, speed-ups); ``--compare`` flags a drop
    higher_is_better: bool = True

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.min, "max": self.max, "rounds": len(self.values),
                "values": list(self.values), "unit": self.unit, "higher_is_better": self.higher_is_better}


def timed(fn: Callable[[], Any], *, min_seconds: float, sync: Callable[[], None] | None = None) -> tuple[int, float]:
    """Call ``fn`` until ``min_seconds`` have passed (at least once): ``(calls, seconds)``."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        if sync is not None:
            sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return calls, elapsed


def rate(fn: Callable[[], Any], items: int, *, rounds: int, min_seconds: float, warmup: int = 1,
         sync: Callable[[], None] | None = None, unit: str = "items/s") -> Stat:
    """``items`` per call of ``fn``: items/s over ``rounds`` rounds of at least ``min_seconds``."""
    for _ in range(warmup):
        fn()
    values = []
    for _ in range(rounds):
        calls, seconds = timed(fn, min_seconds=min_seconds, sync=sync)
        values.append(calls * items / seconds)
    return Stat(values, unit)


def interleaved(fns: Mapping[str, Callable[[], Any]], items: Mapping[str, int], *, rounds: int, min_seconds: float,
                warmup: int = 1, sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Items/s of several functions measured in alternation, round after round, so a change in the
    machine's load during the run hits all of them alike: ``{name: [rate per round]}``."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            calls, seconds = timed(fn, min_seconds=min_seconds, sync=sync)
            out[name].append(calls * items[name] / seconds)
    return out


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> Stat:
    """Per-round ratios of two interleaved series (same round, same load)."""
    return Stat([a / b for a, b in zip(numerator, denominator, strict=True)], "x")

"""Training messages through :mod:`logging`, and the progress display.

Everything training says goes to the ``mmkit`` logger. :func:`setup` gives it one handler per
process unless the application configured its own: rich's handler on a terminal, plain
``time level message`` lines otherwise (a log file, CI, a launcher's pipe). Both write to stdout,
where a launcher keeps each process's output (``logs/.../stdout.log``). Processes other than 0
only report warnings and errors.

:class:`TrainProgress` is a rich progress bar on a terminal and, when the output is not a terminal, a
plain line per logged step (so ``tail -f`` on a log file shows the run moving).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

LOGGER = "mmkit"
log = logging.getLogger("mmkit.training")
_console: Any = None


def is_terminal() -> bool:
    return bool(getattr(sys.stdout, "isatty", lambda: False)())


def console() -> Any:
    """The rich console the terminal handler writes to; progress bars share it so log lines print
    above the bar."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console()
    return _console


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (a test's capture replaces it)."""

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def setup(*, is_main: bool = True) -> None:
    """Route the ``mmkit`` logger to stdout once per process (kept as is when a handler exists:
    the application, or pytest's capture, decides)."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    if logger.handlers:
        return
    handler: logging.Handler
    if is_terminal():
        from rich.logging import RichHandler

        handler = RichHandler(console=console(), show_path=False, markup=False, rich_tracebacks=False)
    else:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.propagate = False


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class TrainProgress:
    """Steps done, loss and tokens/s: a live bar on a terminal (process 0), else a log line per update."""

    def __init__(self, total: int, completed: int, *, enabled: bool):
        self.total, self.completed, self.enabled = total, completed, enabled
        self._start_step, self._start = completed, time.perf_counter()
        self._bar = None
        self._task = None
        if enabled and is_terminal():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("loss {task.fields[loss]:.4f}"),
                                 TextColumn("{task.fields[tps]:,.0f} tok/s"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=console(), transient=False)

    def __enter__(self) -> TrainProgress:
        if self._bar is not None:
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self.completed, loss=float("nan"),
                                            tps=0.0)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def advance(self, step: int) -> None:
        self.completed = step
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def measured(self, step: int, loss: float, tokens_per_s: float) -> None:
        """A logged step's figures."""
        self.completed = step
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=loss, tps=tokens_per_s)
        elif self.enabled:
            elapsed = time.perf_counter() - self._start
            done = step - self._start_step
            eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
            log.info("step %d/%d (%d%%) loss %.4f %s tok/s elapsed %s ETA %s", step, self.total,
                     100 * step // max(self.total, 1), loss, f"{tokens_per_s:,.0f}", _clock(elapsed),
                     _clock(eta) if eta == eta else "?")

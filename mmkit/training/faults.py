"""Faults during training, each with a clear outcome.

- non-finite loss: skip the optimizer step and count it, or stop naming the step and its records
  (``on_nonfinite_loss``; :class:`NonFinitePolicy`).
- out of memory: a :class:`TrainingError` with advice, or (``on_out_of_memory: skip``, ZeRO stage 0)
  the micro-batch is dropped and the step's update skipped and counted (:class:`OutOfMemoryPolicy`).
- a collective that fails or times out (another process died or hangs): a :class:`TrainingError`
  that says so, instead of a hang (the timeout is ``collective_timeout_s``; :class:`CollectiveFailurePolicy`).
- disk full while saving a checkpoint: see :mod:`mmkit.training.checkpoint`.

The faults of one optimizer step are shared in one place, :func:`agree` (one all-reduce of the step's
flags at its boundary), so every process takes the same decision and runs the same collectives after it;
each policy then decides from the agreed flags. A new recoverable policy is a new flag and a policy object.

``MMKIT_FAULT`` injects faults for fault drills and tests: comma-separated ``KIND@STEP`` or
``KIND@STEP:RANK`` (rank 0 when omitted; ``*`` for every rank), where STEP is the optimizer step
being computed (1-based) or, for the ``*_in_save`` kinds, the step of the checkpoint being written:

- ``nan``: that step's loss becomes NaN;  ``oom``: raise an out-of-memory error;
- ``die``: the process kills itself (SIGKILL);  ``hang``: the process sleeps for an hour;
- ``kill_in_save``: SIGKILL in the middle of writing a checkpoint;
- ``enospc_in_save``: an ``OSError(ENOSPC)`` in the middle of writing a checkpoint;
- ``full_in_save`` / ``full_in_engine_save`` / ``full_in_log``: the storage fills up for real while
  mmkit's model files (safetensors), DeepSpeed's files (``torch.save``) or the step's metrics
  (JSONL and TensorBoard) are written: the process's file-size limit (``RLIMIT_FSIZE``) drops to
  zero for that write, so the library's own writer fails with its own error type.

A whole run can also be drilled under a file-size limit (``tests/support/drill.py``: ``run(...,
max_file_size=...)``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import time
from typing import Any

from mmkit.errors import MmkitError

FAULT_ENV = "MMKIT_FAULT"
FAULT_KINDS = ("nan", "oom", "die", "hang", "kill_in_save", "enospc_in_save", "full_in_save", "full_in_engine_save",
               "full_in_log")
#: With ``on_nonfinite_loss: skip``, this many non-finite steps in a row stop the run: the weights
#: themselves have most likely diverged, and skipping further only burns compute.
MAX_CONSECUTIVE_NONFINITE = 20


class TrainingError(MmkitError):
    """Training stopped on a fault; the message says what happened, where, and what to do."""


# -- fault injection (drills and tests) -------------------------------------------------------------
def _parse(spec: str) -> list[tuple[str, int, str]]:
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        kind, _, where = item.partition("@")
        step, _, rank = where.partition(":")
        if kind not in FAULT_KINDS or not step.isdigit():
            raise MmkitError(f"{FAULT_ENV}={spec!r}: expected KIND@STEP[:RANK] with KIND one of "
                             f"{', '.join(FAULT_KINDS)}")
        out.append((kind, int(step), rank or "0"))
    return out


def injected(kind: str, step: int, rank: int) -> bool:
    """Whether ``MMKIT_FAULT`` asks for fault ``kind`` at ``step`` on process ``rank``."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return False
    return any(k == kind and s == step and r in ("*", str(rank)) for k, s, r in _parse(spec))


def inject_process_faults(step: int, rank: int) -> None:
    """``die`` / ``hang`` / ``oom`` at the start of ``step``."""
    if injected("die", step, rank):
        os.kill(os.getpid(), signal.SIGKILL)
    if injected("hang", step, rank):
        time.sleep(3600)
    if injected("oom", step, rank):
        raise MemoryError(f"injected out-of-memory ({FAULT_ENV})")


@contextlib.contextmanager
def storage_fills(kind: str, step: int, rank: int):
    """While active, when ``MMKIT_FAULT`` asks for ``kind`` here, no file may grow (``RLIMIT_FSIZE``
    0, ``SIGXFSZ`` ignored so writes fail with ``EFBIG`` instead of killing the process)."""
    if not injected(kind, step, rank):
        yield
        return
    import resource

    previous_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, previous_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous_limit)
        signal.signal(signal.SIGXFSZ, previous_handler)


def inject_save_fault(step: int, rank: int) -> None:
    if injected("kill_in_save", step, rank):
        os.kill(os.getpid(), signal.SIGKILL)
    if injected("enospc_in_save", step, rank):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# -- recognising faults -----------------------------------------------------------------------------
#: How libraries word a failed write when they do not raise ``OSError``: torch.save (DeepSpeed's
#: checkpoints) raises ``RuntimeError("[enforce fail at inline_container.cc] ... PytorchStreamWriter
#: failed writing file ...: file write failed")``; safetensors raises ``SafetensorError("Error while
#: serializing: IoError(Os { code: 28, kind: StorageFull, ... })")``.
_STORAGE_WORDS = ("pytorchstreamwriter", "file write failed", "ioerror", "no space left", "storagefull",
                  "disk quota", "file too large", "filetoolarge", "read-only file system", "unexpected pos")


def is_storage_error(exc: BaseException) -> bool:
    """Whether ``exc`` (raised while writing files) is the storage failing: a full disk, a quota, a
    file-size limit, a read-only or vanished filesystem, whichever library did the writing."""
    if isinstance(exc, OSError):
        return True
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        SafetensorError = ()  # noqa: N806
    text = str(exc).lower()
    if SafetensorError and isinstance(exc, SafetensorError):
        return "serializ" in text or any(word in text for word in _STORAGE_WORDS)
    return isinstance(exc, RuntimeError) and any(word in text for word in _STORAGE_WORDS)


def describe_storage_error(exc: BaseException, target: Any = None) -> str:
    """``No space left on device (PATH)``: the operating system's words when there are some."""
    if isinstance(exc, OSError):
        target = exc.filename or target
        text = exc.strerror or str(exc)
    else:
        text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        if "unexpected pos" in text or "file write failed" in text:  # torch.save's words for a short write
            text = f"a write stopped short: the disk is full or a quota or file-size limit was reached ({text})"
        for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO):
            if f"code: {code}," in text or os.strerror(code).lower() in text.lower():
                text = f"{os.strerror(code)} ({type(exc).__name__}: {text[:200]})"
                break
        else:
            text = f"{type(exc).__name__}: {text[:300]}"
    return text + (f" ({target})" if target else "")


def storage_error(exc: BaseException, *, what: str, last_checkpoint: str | None) -> TrainingError:
    """A failed write outside a checkpoint save (the model, metrics, TensorBoard), as a clear error."""
    kept = (f"the last checkpoint {last_checkpoint} is intact: free space and rerun the same command to resume "
            "from it" if last_checkpoint else "no checkpoint was written yet")
    return TrainingError(f"could not write {what}: {describe_storage_error(exc)} (a storage error); {kept}.")


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text
                                              or "DefaultCPUAllocator" in text)


_COLLECTIVE_WORDS = ("gloo", "nccl", "connection closed by peer", "connection reset by peer", "timed out",
                     "broken pipe", "processgroup", "socket", "watchdog")


def is_collective_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(word in text for word in _COLLECTIVE_WORDS)


def out_of_memory_error(exc: BaseException, *, step: int, cfg: Any, device: Any) -> TrainingError:
    where = str(device)
    peak = ""
    try:
        import torch

        if device.type == "cuda":
            peak = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB allocated"
    except Exception:  # noqa: BLE001 - the advice matters more than the figure
        pass
    advice = [
        f"lower micro_batch_size ({cfg.micro_batch_size}) and set global_batch_size (or raise grad_accum) to "
        "keep the same global batch",
        "turn on --gradient-checkpointing",
    ]
    if cfg.zero_stage < 3:
        advice.append(f"--zero-stage 3 (now {cfg.zero_stage}) partitions weights, gradients and optimizer state "
                      "across processes")
    if cfg.precision == "fp32":
        advice.append("--precision bf16 halves weight and activation memory on GPUs that support it")
    advice.append(f"shorten max_length ({cfg.max_length}) or use fewer/lower-resolution modality tokens")
    return TrainingError(f"out of memory at step {step} on {where}{peak}: {exc}. To fit: " + "; ".join(advice) + ".")


def collective_failure_error(exc: BaseException, *, rank: int, world: int, step: int, timeout_s: float,
                             last_checkpoint: str | None) -> TrainingError:
    resume = (f"The last checkpoint ({last_checkpoint}) is intact: rerun the same command to resume"
              if last_checkpoint else "No checkpoint was written yet (save_every sets how often to write one)")
    return TrainingError(
        f"process {rank} of {world}: a collective operation failed at step {step} "
        f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}). "
        f"Another training process has most likely died or stopped responding (collectives time out after "
        f"{timeout_s:g}s, collective_timeout_s); look for its error above. {resume}.")


class StepGate:
    """Lets the loop skip an optimizer update: DeepSpeed's wrappers (ZeRO 1-3, bf16) all end in
    the basic optimizer's ``step``, which this replaces with one that does nothing while
    ``skip`` is set. Gradients are still reduced and then zeroed as usual, so every process runs
    the same collectives."""

    def __init__(self, engine: Any):
        self.skip = False
        optimizer = getattr(engine, "basic_optimizer", None) or engine.optimizer
        original = optimizer.step

        @functools.wraps(original)  # keeps the marks torch's LR scheduler put on it
        def step(*args: Any, **kwargs: Any) -> Any:
            if self.skip:
                return None
            return original(*args, **kwargs)

        optimizer.step = step


# -- policies: what a fault does to the run, decided the same way on every process -----------------------
class StepFaults:
    """What went wrong on this process during the micro-batches of the step being computed."""

    def __init__(self) -> None:
        self.nonfinite: list[str] = []  # "loss nan on process R, records ..."
        self.out_of_memory: list[str] = []  # "process R: <the error>"
        self.first_oom: BaseException | None = None

    def clear(self) -> None:
        self.__init__()


class Agreed:
    """The step's faults as every process sees them: the flags were summed over processes in one
    collective, so every process takes the same branch (and runs the same collectives after it)."""

    def __init__(self, nonfinite: bool, out_of_memory: bool):
        self.nonfinite, self.out_of_memory = nonfinite, out_of_memory

    @property
    def skip(self) -> bool:
        return self.nonfinite or self.out_of_memory


def agree(local: StepFaults, world: int) -> Agreed:
    """The one place fault decisions are shared: one all-reduce of this step's flags per optimizer step."""
    from mmkit.training import distributed as dist_util

    flags = [1.0 if local.nonfinite else 0.0, 1.0 if local.out_of_memory else 0.0]
    if world > 1:
        flags = dist_util.all_reduce_sum(flags)
    return Agreed(nonfinite=flags[0] > 0, out_of_memory=flags[1] > 0)


def gather_notes(notes: list[str], world: int) -> list[str]:
    """Every process's notes (a collective: call only on an agreed branch)."""
    from mmkit.training import distributed as dist_util

    everywhere = dist_util.all_gather_objects(notes) if world > 1 else [notes]
    return [n for ns in everywhere for n in ns]


class NonFinitePolicy:
    """A NaN/inf loss: ``skip`` the update everywhere and count it (stop after ``max_consecutive`` in a
    row: the weights have diverged), or ``stop`` naming the step and its records."""

    def __init__(self, mode: str, *, max_consecutive: int = MAX_CONSECUTIVE_NONFINITE):
        self.mode, self.max_consecutive = mode, max_consecutive
        self.consecutive = 0

    def before_update(self, agreed: Agreed, notes: list[str], *, world: int, step: int, epoch: int,
                      step_in_epoch: int, last_checkpoint: str | None) -> None:
        """Raises under ``stop`` (every process, with every process's notes) before any update."""
        if agreed.nonfinite and self.mode == "stop":
            detail = "; ".join(gather_notes(notes, world))
            raise TrainingError(
                f"non-finite loss at step {step} (epoch {epoch}, step {step_in_epoch + 1} of the epoch): {detail}. "
                "No update was applied. Check those records, lower the learning rate, or set on_nonfinite_loss: "
                f"skip to skip such steps; the last checkpoint is {last_checkpoint or 'none (nothing saved yet)'}")

    def after_skip(self, agreed: Agreed, *, step: int, last_checkpoint: str | None) -> None:
        if not agreed.nonfinite:
            self.consecutive = 0
            return
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise TrainingError(
                f"{self.consecutive} steps in a row up to step {step} had a non-finite loss: the weights have most "
                "likely diverged. Lower the learning rate (or use fp32 / bf16 instead of fp16) and resume from the "
                f"last checkpoint ({last_checkpoint or 'none'})")


class OutOfMemoryPolicy:
    """Out of memory in a micro-batch: ``stop`` with advice (the default), or ``skip``: the micro-batch
    is replaced by a zero-weight stand-in (so the gradient all-reduce still pairs up), the step's
    update is skipped on every process and counted; ``max_consecutive`` skipped steps in a row stop."""

    def __init__(self, mode: str, *, cfg: Any, device: Any, max_consecutive: int = 10):
        self.mode, self.cfg, self.device, self.max_consecutive = mode, cfg, device, max_consecutive
        self.consecutive = 0
        self.skipped_steps = 0

    def recover(self, exc: BaseException, *, step: int) -> bool:
        """Whether to carry on after ``exc`` (an OOM) in a micro-batch of ``step``; else the caller raises
        :meth:`error`."""
        if self.mode != "skip":
            return False
        free_memory(self.device)
        return True

    def error(self, exc: BaseException, *, step: int) -> TrainingError:
        return out_of_memory_error(exc, step=step, cfg=self.cfg, device=self.device)

    def after_skip(self, agreed: Agreed, *, step: int) -> None:
        if not agreed.out_of_memory:
            self.consecutive = 0
            return
        self.skipped_steps += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise TrainingError(f"out of memory in {self.consecutive} steps in a row up to step {step} "
                                "(on_out_of_memory: skip): the batches do not fit; lower micro_batch_size or "
                                "max_length, or turn on --gradient-checkpointing")


class CollectiveFailurePolicy:
    """A collective that failed or timed out: another process died or hangs. Nothing to agree on (the
    group is broken): every process that sees it stops with an error saying so."""

    def __init__(self, *, rank: int, world: int, timeout_s: float):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s

    def error(self, exc: BaseException, *, step: int, last_checkpoint: str | None) -> TrainingError | None:
        if self.world > 1 and is_collective_failure(exc):
            return collective_failure_error(exc, rank=self.rank, world=self.world, step=step,
                                            timeout_s=self.timeout_s, last_checkpoint=last_checkpoint)
        return None


def free_memory(device: Any) -> None:
    """Hand cached accelerator memory back after an out-of-memory error."""
    import gc

    gc.collect()
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.empty_cache()

"""The run directory as a transaction: one run at a time holds it, and a refused run leaves it as it was.

- :class:`RunLock`: an exclusive ``flock`` on ``OUTPUT_DIR/.lock``; the holder writes its pid and
  host into the file, so a second run is refused naming them. The kernel drops the lock when the
  holder exits, however it exits (SIGKILL included), so a stale lock never blocks a rerun.
- :func:`check_output_dir`: an output directory that is a file, or that cannot be written, is a
  clear error before anything else happens.
- :func:`admit`: every check that can refuse the run, before anything in the directory changes; the
  demo data is generated into a hidden staging directory and moved in only when the run is admitted
  (and only when it differs from what is there).
"""

from __future__ import annotations

import errno
import fcntl
import filecmp
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs

from mmkit.errors import ConfigError, MmkitError
from mmkit.atomic import default_mode, swap_in

LOCK = ".lock"


class RunInUseError(ConfigError):
    """Another run holds the output directory."""


def check_output_dir(output_dir: Path) -> None:
    """Refuse an output directory that is a file, sits under a file, or cannot be written."""
    out = Path(output_dir)
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == out else f"cannot be created: {existing} is a file"
        raise ConfigError(f"--output-dir {out} {what}; give a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == out else f"cannot be created: {existing} is not writable"
        raise ConfigError(f"--output-dir {out} {what} (permissions or a read-only filesystem); give a writable "
                          "directory")


class RunLock:
    """``with RunLock(out):`` holds ``out/.lock`` exclusively for the life of the run.

    ``created`` says whether this lock created the output directory (a refused run then removes
    it again, leaving no trace)."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK
        self.created = False
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        check_output_dir(self.output_dir)
        try:
            if not self.output_dir.is_dir():
                self.output_dir.mkdir(parents=True)
                self.created = True
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(f"--output-dir {self.output_dir}: cannot be used ({exc.strerror or exc}); give a "
                              "writable directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"--output-dir {self.output_dir}: cannot lock {self.path} ({exc.strerror}); "
                                  "the filesystem may not support locks") from None
            who = (f"pid {holder.get('pid')} on host {holder.get('host')}"
                   + (f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['started']))}"
                      if isinstance(holder.get("started"), (int, float)) else "")) if holder else "an unknown process"
            if holder and _exited(holder):  # killed: a data-loader worker it forked holds the lock a few s more
                who += "; that process has exited and the processes it started are finishing: retry in a few seconds"
            raise RunInUseError(f"--output-dir {self.output_dir} is in use by another mmkit run ({who}): wait for "
                                "it to finish, stop it, or give another --output-dir. Nothing was changed.") from None
        self._fd = fd
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}) + "\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        return self

    def release(self, *, refused: bool = False) -> None:
        """Drop the lock; a refused run that created the output directory removes it (if empty)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if refused and self.created and [p.name for p in self.output_dir.iterdir()] == [LOCK]:
            self.path.unlink(missing_ok=True)
            try:
                self.output_dir.rmdir()
            except OSError:
                pass  # something else was put there meanwhile: leave it
        else:
            try:
                os.ftruncate(fd, 0)  # the file stays (deleting a lock file races with a waiting locker)
            except OSError:
                pass
        fcntl.flock(fd, fcntl.LOCK_UN)  # also for loader workers that inherited the descriptor
        os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.release()


def _exited(holder: dict[str, Any]) -> bool:
    """Whether the lock's recorded holder is a process of this host that no longer exists."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists, owned by someone else
    return False


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}


# -- admitting a run: every check that can refuse it, before anything in the output directory changes --
DEMO = "demo_data"


@attrs.define
class Admission:
    """What an admitted run may change in its output directory, applied by :meth:`commit`."""

    output_dir: Path
    demo_staged: Path | None = None  # freshly generated demo data, not yet in place
    demo_changed: bool = False  # it differs from (or there is no) OUTPUT_DIR/demo_data
    start_over: bool = False  # resume: never, and the demo data changes: earlier results go first
    notes: list[str] = attrs.field(factory=list)
    committed: bool = False

    def commit(self) -> None:
        """Apply the run's first writes: put the demo data in place (only when it changed)."""
        from mmkit.training.checkpoint import start_over
        from mmkit.training.logs import log

        if self.start_over:
            removed = start_over(self.output_dir)
            if removed:
                log.info("resume: never: removed %s of an earlier run in %s", " and ".join(removed), self.output_dir)
        if self.demo_staged is not None:
            if self.demo_changed:
                swap_in(self.demo_staged, self.output_dir / DEMO)
            else:
                shutil.rmtree(self.demo_staged, ignore_errors=True)
        self.committed = True

    def abandon(self) -> None:
        if self.demo_staged is not None and not self.committed:
            shutil.rmtree(self.demo_staged, ignore_errors=True)


def admit(cfg: Any, host: Any, modalities: tuple[str, ...], *, prepare_demo: Any) -> Admission:
    """Every check of the output directory that can refuse the run, writing nothing there but a
    hidden staging directory (removed again when the run is refused):

    - the checkpoint this run would continue belongs to the same run (the options that must match);
    - it was trained on this base LLM (weights, tokenizer, chat template), unless allowed;
    - a finished model with no checkpoint to continue from is not silently replaced;
    - the demo data (generated into the staging directory) is the data the checkpoint was trained on.
    """
    from mmkit.training.checkpoint import check_same_run, read_state, resume_candidates

    out = Path(cfg.output_dir)
    for stale in out.glob(f".{DEMO}.*.tmp"):  # left by a killed run (we hold the lock: nobody uses it)
        shutil.rmtree(stale, ignore_errors=True)
    config = attrs.evolve(cfg, modalities=modalities).to_dict()
    admission = Admission(out)
    candidates = [] if cfg.resume == "never" else resume_candidates(cfg.resume, out)[0]
    for candidate in candidates:  # the newest readable one; verification later may fall back to older ones
        try:
            saved = read_state(candidate)
        except (OSError, ValueError, RecursionError, MmkitError):
            continue
        check_same_run(saved, config)
        if not cfg.is_demo:
            admission.notes += _check_base(candidate, cfg.llm, allow=cfg.allow_base_mismatch)
        break
    finished = out / "model" / "mmkit.json"
    if cfg.resume == "auto" and not candidates and finished.is_file():
        raise ConfigError(f"{out} holds a finished model ({out / 'model'}) and no checkpoint to continue from: this "
                          "run would replace it. Start over with --resume never (the earlier model is removed), or "
                          "give another --output-dir. Nothing was changed.")
    if cfg.is_demo:
        staged = Path(tempfile.mkdtemp(prefix=f".{DEMO}.", suffix=".tmp", dir=out))
        os.chmod(staged, default_mode(directory=True))
        admission.demo_staged = staged
        try:
            demo = prepare_demo(host, modalities, staged, seed=cfg.seed)
            admission.notes.append(demo.note())  # the text-only records are said, not silent
            existing = out / DEMO
            admission.demo_changed = not (existing.is_dir() and same_tree(existing, staged))
            if admission.demo_changed and existing.exists():
                if candidates:
                    raise ConfigError(
                        f"the demo data generated now differs from {existing}, which the checkpoint was trained on "
                        "(the plugins changed?): resuming would train on other data. Start over with --resume never, "
                        "or give another --output-dir. Nothing was changed.")
                admission.start_over = cfg.resume == "never"
        except BaseException:
            admission.abandon()
            raise
    return admission


def _check_base(checkpoint: Path, llm: str | None, *, allow: bool) -> list[str]:
    """The base LLM's files against the fingerprint the checkpoint's model was saved with."""
    if llm is None:
        return []
    from mmkit.modeling.persistence import base_files_fingerprint, compare_base, read_meta

    try:
        meta = read_meta(checkpoint / "model")
    except MmkitError:
        return []  # verification names what is wrong with that checkpoint
    return compare_base(meta["llm"]["fingerprint"], base_files_fingerprint(llm), allow_mismatch=allow,
                        what="the checkpoint")


def same_tree(a: Path, b: Path) -> bool:
    """Whether two directories hold the same files with the same bytes."""
    def listing(root: Path) -> dict[str, Path]:
        return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}

    left, right = listing(a), listing(b)
    if left.keys() != right.keys():
        return False
    for rel, path in left.items():
        other = right[rel]
        if path.stat().st_size != other.stat().st_size or not filecmp.cmp(path, other, shallow=False):
            return False
    return True

"""Training checkpoints: written atomically, verified before loading, resumed exactly.

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

Every process writes into ``.step-NNNNNNNN.tmp``; once all of them report success, rank 0 writes
the manifest and renames the directory into place, so a checkpoint directory either is complete
or does not exist. A kill or a full disk during a save leaves the previous checkpoint untouched
(failures inside DeepSpeed's writers are held back until every process has finished its part, so
nobody is left waiting in a collective). Only the newest ``keep_last`` checkpoints are kept.

Loading verifies the manifest (hashes of every file a process reads, and no file it does not list)
before anything is read. A manifest detects corruption, not tampering: anyone who can replace a file
can recompute its hash. So DeepSpeed's ``torch.save`` files are loaded with ``weights_only=True``
(tensors, containers and an allow-list of the few plain DeepSpeed types it stores): a file that
needs full unpickling, which could run code, is refused unless ``--trust-checkpoint``. With
``MMKIT_CHECKPOINT_KEY`` set, manifests are signed (HMAC-SHA256) when written and must carry a valid
signature to be loaded, so checkpoints on a shared filesystem can be trusted as a whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import attrs

from mmkit.errors import CheckpointMismatchError, ConfigError
from mmkit.training import distributed as dist_util
from mmkit.atomic import _fsync_dir, atomic_write_text, default_mode
from mmkit.training.config import IGNORED, MUST_MATCH, fields_with_rule
from mmkit.training.faults import (
    TrainingError,
    describe_storage_error,
    inject_save_fault,
    is_storage_error,
    storage_fills,
)

FORMAT = 1
CHECKPOINTS = "checkpoints"
STATE = "trainer_state.json"
MANIFEST = "manifest.json"
DS_TAG = "deepspeed"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rank-)(\d+)")

#: Options that must match for a resumed run to continue the same training; the others may change
#: (a longer schedule, another log interval, ...) and are reported when they do. Each TrainConfig
#: field declares its rule (``resume=`` in config.py); zero_stage is quiet: see the process-count note.
RESUME_STRICT = fields_with_rule(MUST_MATCH)
#: Never reported (they do not change what is trained).
_RESUME_QUIET = fields_with_rule(IGNORED)


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


# -- saving -------------------------------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, (tuple, set)) else repr(v)))


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


class _DeferredWrites:
    """While active, DeepSpeed's file writes record an ``OSError`` instead of raising it: a process
    that raised half-way through ``save_checkpoint`` would skip the collectives its peers wait in."""

    def __init__(self, engine: Any, step: int, rank: int, failures: list[str]):
        self.engine, self.step, self.rank, self.failures = engine, step, rank, failures
        self._saved: list[tuple[Any, str, Any]] = []

    def _guard(self, obj: Any, name: str, *, inject: bool = False) -> None:
        original = getattr(obj, name)
        failures, step, rank = self.failures, self.step, self.rank

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if failures:
                return None  # this process already failed: write nothing more
            try:
                if inject:
                    inject_save_fault(step, rank)
                with storage_fills("full_in_engine_save", step, rank):
                    return original(*args, **kwargs)
            except Exception as exc:  # a storage error from any writer (torch.save raises RuntimeError)
                if not is_storage_error(exc):
                    raise
                failures.append(_describe_os_error(exc, args))
                return None

        self._saved.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, guarded)

    def __enter__(self) -> _DeferredWrites:
        self._guard(self.engine.checkpoint_engine, "save", inject=True)
        if hasattr(self.engine, "_copy_recovery_script"):
            self._guard(self.engine, "_copy_recovery_script")
        return self

    def __exit__(self, *exc: Any) -> None:
        for obj, name, previous in reversed(self._saved):
            if previous is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, previous)


_MISSING = object()


def _describe_os_error(exc: BaseException, args: tuple = ()) -> str:
    return describe_storage_error(exc, next((a for a in args if isinstance(a, (str, Path))), None))


def _attempt(failures: list[str], fn: Any, *args: Any, **kwargs: Any) -> None:
    """Run one writer; a storage error (OSError, safetensors' SafetensorError, torch's write
    failures) is recorded for :func:`_agree` instead of raised, so no process skips a collective."""
    if failures:
        return
    try:
        fn(*args, **kwargs)
    except Exception as exc:
        if not is_storage_error(exc):
            raise
        failures.append(_describe_os_error(exc, args))


def _write_rng(directory: Path, rank: int, step: int) -> None:
    from safetensors.torch import save_file

    inject_save_fault(step, rank)  # (drills) for processes that DeepSpeed had nothing to write for
    path = _rng_file(directory, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, meta = rng_state()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    os.chmod(path, default_mode())  # safetensors writes 0600; files of a run are read by the group


def _write_manifest(directory: Path, step: int) -> None:
    from mmkit.modeling.persistence import sha256

    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"sha256": sha256(path), "size": path.stat().st_size}
    manifest: dict[str, Any] = {"format": FORMAT, "step": step, "files": files}
    key = signing_key()
    if key is not None:
        manifest["signature"] = {"algorithm": "hmac-sha256", "value": _sign(manifest, key)}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")


#: Environment variable holding the key that signs and verifies checkpoint manifests.
KEY_ENV = "MMKIT_CHECKPOINT_KEY"


def signing_key() -> bytes | None:
    key = os.environ.get(KEY_ENV)
    return key.encode("utf-8") if key else None


def _sign(manifest: dict[str, Any], key: bytes) -> str:
    body = {k: v for k, v in manifest.items() if k != "signature"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hmac.new(key, canonical, hashlib.sha256).hexdigest()


def _signature_problem(manifest: dict[str, Any]) -> str | None:
    key = signing_key()
    if key is None:
        return None  # nothing to check against (a signed manifest is still hash-checked)
    signature = manifest.get("signature")
    if not isinstance(signature, dict) or "value" not in signature:
        return f"{MANIFEST} is not signed, and {KEY_ENV} is set: only signed checkpoints are trusted"
    if signature.get("algorithm") != "hmac-sha256" or not hmac.compare_digest(str(signature["value"]),
                                                                                _sign(manifest, key)):
        return f"{MANIFEST} has a bad signature for the key in {KEY_ENV} (tampered, or signed with another key)"
    return None


def _remove(path: Path) -> None:
    """Delete a directory so that no half-deleted checkpoint can ever be mistaken for one: rename it
    to a hidden name first."""
    if not path.exists():
        return
    doomed = path.with_name(f".{path.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(output_dir: Path, *, engine: Any, assembled: Any, stage: str, state: TrainState,
                    run_info: dict[str, Any], keep_last: int, rank: int) -> Path:
    """Write checkpoint ``step-<state.step>`` (every process must call this) and return its path.

    Raises :class:`TrainingError` on every process when any of them failed to write (disk full,
    permissions); the previous checkpoint is then still the newest complete one.
    """
    from mmkit.modeling.persistence import build_meta, random_init_encoder_state, trainable_state, write_model_files

    root = checkpoint_root(output_dir)
    name = step_name(state.step)
    final, tmp = root / name, root / f".{name}.tmp"
    failures: list[str] = []
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step-*"):  # leftovers of an interrupted save or delete
            shutil.rmtree(stale, ignore_errors=True)
        _attempt(failures, tmp.mkdir)
    problems = _agree(failures)
    if problems:
        raise _write_failed(output_dir, name, problems)

    # 1. trainable weights, gathered from ZeRO-3 partitions (a collective: every process takes part)
    weights = trainable_state(assembled.model)
    encoder_weights = random_init_encoder_state(assembled.model, assembled.components)
    if rank == 0:
        meta = build_meta(assembled, tmp / "model", stage=stage)
        with storage_fills("full_in_save", state.step, rank):
            _attempt(failures, write_model_files, tmp / "model", state=weights, encoder_state=encoder_weights,
                     meta=meta, tokenizer=assembled.tokenizer)
    del weights, encoder_weights
    # 2. DeepSpeed: optimizer partitions, scheduler, counters (frozen base weights are not copied)
    with _DeferredWrites(engine, state.step, rank, failures):
        engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
    # 3. this process's RNG
    _attempt(failures, _write_rng, tmp, rank, state.step)
    # 4. every process agrees before anything becomes visible
    problems = _agree(failures)
    if problems:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(output_dir, name, problems)
    if rank == 0:
        record = {**run_info, "format": FORMAT, **attrs.asdict(state), "saved_at": time.time()}
        _attempt(failures, lambda: (tmp / STATE).write_text(json.dumps(_json_safe(record), indent=1, sort_keys=True),
                                                            encoding="utf-8"))
        _attempt(failures, _write_manifest, tmp, state.step)
        if not failures:
            _attempt(failures, _swap_in, tmp, final)
        if failures:
            shutil.rmtree(tmp, ignore_errors=True)
    problems = _agree(failures)
    if problems:
        raise _write_failed(output_dir, name, problems)
    if rank == 0:
        try:
            atomic_write_text(root / LATEST, name + "\n")
        except OSError:
            pass  # a convenience pointer; resuming scans the directories themselves
        for old in list_checkpoints(output_dir)[max(1, keep_last):]:
            _remove(old)
    dist_util.barrier()
    return final


def _swap_in(tmp: Path, final: Path) -> None:
    _fsync_dir(tmp)
    if final.exists():  # the same step written again (a run restarted with resume: never)
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _agree(failures: list[str]) -> list[str]:
    """Every process's write failures, as ``process R: reason`` (every process must call this)."""
    everyone = dist_util.all_gather_objects(list(failures))
    return [f"process {r}: {reason}" for r, reasons in enumerate(everyone) for reason in reasons]


def _write_failed(output_dir: Path, name: str, problems: list[str]) -> TrainingError:
    dist_util.barrier()  # every process has stopped writing before anyone looks at the directory
    previous = list_checkpoints(output_dir)
    kept = (f"the previous checkpoint {previous[0]} is kept and loadable; free space and rerun the same command to "
            "resume from it") if previous else "no earlier checkpoint exists"
    return TrainingError(f"could not write checkpoint {name} in {checkpoint_root(output_dir)} "
                         f"({'; '.join(problems)}): {kept}.")


# -- choosing and verifying a checkpoint to resume from ----------------------------------------------------
def resume_candidates(resume: str, output_dir: Path) -> tuple[list[Path], bool]:
    """``(checkpoints to try, newest first; explicit)`` for the ``resume`` option."""
    if resume == "never":
        return [], False
    if resume == "auto":
        return list_checkpoints(output_dir), False
    path = Path(resume)
    if (path / MANIFEST).is_file():
        return [path], True
    found = list_checkpoints(path)
    if not found:
        raise ConfigError(f"--resume {resume}: no complete checkpoint there (expected a checkpoints/step-N directory "
                          f"with {MANIFEST}, or a run directory holding some)")
    return found, True


def verify(checkpoint: Path, rank: int) -> str | None:
    """Check the files this process will read against the manifest; ``None`` when intact, else why not."""
    from mmkit.modeling.persistence import sha256

    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        return f"unreadable {MANIFEST}: {exc}"
    if not isinstance(manifest, dict):
        return f"{MANIFEST} is a JSON {type(manifest).__name__}, not the object mmkit writes"
    if manifest.get("format") != FORMAT:
        return f"{MANIFEST} format {manifest.get('format')!r}, this mmkit reads {FORMAT}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("size"), int)
            for e in files.values()):
        return f"{MANIFEST} has no valid 'files' table (name -> sha256 and size)"
    problem = _signature_problem(manifest)
    if problem:
        return problem
    escaping = [rel for rel in files if Path(rel).is_absolute() or ".." in Path(rel).parts]
    if escaping:
        return f"{MANIFEST} names a file outside the checkpoint: {escaping[0]}"
    unlisted = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*")
                      if p.is_file() and p.name != MANIFEST and p.relative_to(checkpoint).as_posix() not in files)
    if unlisted:
        return f"{unlisted[0]} is not listed in {MANIFEST} (added after the checkpoint was written)"
    for rel, expected in files.items():  # cheap checks first
        path = checkpoint / rel
        if not path.is_file():
            return f"missing {rel} (multi-node runs need the output directory on a filesystem every node sees)"
        if path.stat().st_size != expected["size"]:
            return f"{rel} has the wrong size (truncated or replaced)"
    for rel, expected in files.items():
        path = checkpoint / rel
        owner = _RANK_FILE.search(Path(rel).name)
        if owner is not None and int(owner.group(1)) != rank:
            continue  # another process's partition: that process checks it
        if sha256(path) != expected["sha256"]:
            return f"{rel} does not match its sha256 in {MANIFEST} (corrupt or replaced)"
    if STATE not in manifest.get("files", {}):
        return f"no {STATE}"
    return None


def choose_checkpoint(candidates: list[Path], explicit: bool, *, rank: int, console: Any = None) -> Path | None:
    """The newest candidate every process finds intact (every process must call this)."""
    candidates = dist_util.broadcast_object([str(c) for c in candidates])
    for candidate in map(Path, candidates):
        problem = verify(candidate, rank)
        if dist_util.all_true(problem is None):
            return candidate
        problems = dist_util.all_gather_objects(problem)
        why = "; ".join(f"process {r}: {p}" for r, p in enumerate(problems) if p)
        if explicit and len(candidates) == 1:
            raise CheckpointMismatchError(f"checkpoint {candidate} failed verification: {why}")
        if rank == 0 and console is not None:
            console.print(f"[yellow]checkpoint {candidate} failed verification ({why}); trying an older one[/]")
    if candidates:
        raise CheckpointMismatchError("no intact checkpoint under "
                                      f"{Path(candidates[0]).parent}: every candidate failed verification "
                                      "(resume: never starts over)")
    return None


def read_state(checkpoint: Path) -> dict[str, Any]:
    state = json.loads((checkpoint / STATE).read_text(encoding="utf-8"))
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f"{checkpoint / STATE}: expected a JSON object, found a {type(state).__name__}")
    return state


def check_same_run(saved: dict[str, Any], config: dict[str, Any]) -> None:
    """Raise when the checkpoint's options that must match (``RESUME_STRICT``) differ from ``config``."""
    saved_config = saved.get("config", {})
    now = _json_safe(config)
    diffs = [k for k in RESUME_STRICT if saved_config.get(k) != now.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: checkpoint {saved_config.get(k)!r}, now {now.get(k)!r}" for k in diffs)
        raise CheckpointMismatchError(f"the checkpoint belongs to a different training run ({detail}). Resume with the "
                                      "same options, or start over with --resume never (or another --output-dir)")


def check_resumable(saved: dict[str, Any], *, config: dict[str, Any], world_size: int, geometry: dict[str, int],
                    trainable: dict[str, list[int]], on_world_size_change: str) -> tuple[str, list[str]]:
    """How to resume (``"exact"`` or ``"reset_optimizer"``) and notes for the user; raises when the
    checkpoint belongs to a different training run.

    - The model, data, seed and global batch must match (the data position is counted in global
      batches drawn from the seed).
    - The process count may change under ZeRO stage 0: the optimizer state is whole in every
      process and the global batches are the same, so training continues (equal up to float
      summation order). Under ZeRO 1-3 the optimizer state is partitioned per process: the run
      refuses, unless ``on_world_size_change: reset_optimizer``, which restores the trainable
      weights, schedule, RNG and data position and starts the optimizer moments from zero.
    """
    check_same_run(saved, config)
    saved_config = saved.get("config", {})
    now = _json_safe(config)
    if saved.get("global_batch_size") != geometry["global_batch_size"]:
        raise CheckpointMismatchError(
            f"global batch differs: checkpoint {saved.get('global_batch_size')} "
            f"({saved.get('micro_batch_size')} x {saved.get('grad_accum')} x {saved.get('world_size')} processes), "
            f"now {geometry['global_batch_size']} ({geometry['micro_batch_size']} x {geometry['grad_accum']} x "
            f"{world_size}). Set global_batch_size: {saved.get('global_batch_size')} (grad_accum is then derived "
            "from it) to resume")
    if saved.get("num_samples") != geometry["num_samples"]:
        raise CheckpointMismatchError(f"the training data changed: {geometry['num_samples']} usable records now, "
                                      f"{saved.get('num_samples')} when the checkpoint was written")
    saved_trainable = saved.get("trainable", {})
    if saved_trainable != trainable:
        missing = sorted(set(trainable) - set(saved_trainable))
        extra = sorted(set(saved_trainable) - set(trainable))
        shapes = sorted(k for k in set(trainable) & set(saved_trainable) if trainable[k] != saved_trainable[k])
        parts = ([f"not in the checkpoint: {', '.join(missing[:4])}"] if missing else []) + \
                ([f"only in the checkpoint: {', '.join(extra[:4])}"] if extra else []) + \
                [f"{k}: checkpoint {saved_trainable[k]}, model {trainable[k]}" for k in shapes[:4]]
        raise CheckpointMismatchError("the trainable parameters differ from the checkpoint's ("
                                      + "; ".join(parts) + ")")
    notes = [f"{k} changed: checkpoint {saved_config.get(k)!r}, now {now.get(k)!r}" for k in sorted(now)
             if k not in RESUME_STRICT and k not in _RESUME_QUIET and saved_config.get(k) != now.get(k)]
    mode = "exact"
    saved_world, saved_stage = saved.get("world_size"), saved.get("zero_stage")
    stage_now = config.get("zero_stage")
    if saved_world != world_size or saved_stage != stage_now:
        change = (f"{saved_world} process(es) with ZeRO stage {saved_stage} -> {world_size} with stage {stage_now}")
        if saved_stage == 0 and stage_now == 0:
            notes.append(f"{change}: the optimizer state is not partitioned, so training continues with the same "
                         "global batches (results equal up to the order of floating-point sums)")
        elif on_world_size_change == "reset_optimizer":
            mode = "reset_optimizer"
            notes.append(f"{change}: restoring the trainable weights, schedule, RNG and data position; the optimizer "
                         "moments start again from zero (on_world_size_change: reset_optimizer)")
        else:
            raise CheckpointMismatchError(
                f"the checkpoint was written by {saved_world} process(es) with ZeRO stage {saved_stage}; this run has "
                f"{world_size} with stage {stage_now}. ZeRO partitions the optimizer state per process, so it "
                f"cannot be loaded as it is. Resume with --num-procs {saved_world} --zero-stage {saved_stage} for an "
                "exact continuation, or set on_world_size_change: reset_optimizer to keep the weights, schedule and data "
                "position and restart the optimizer moments")
    return mode, notes


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


def load_trainable_weights(checkpoint: Path, assembled: Any) -> None:
    """The gathered trainable weights into a model not yet wrapped by DeepSpeed."""
    from mmkit.modeling.persistence import load_state_strict, load_weights, read_meta

    directory = checkpoint / "model"
    meta = read_meta(directory)
    load_state_strict(assembled.model, load_weights(directory, "trainable.safetensors", meta),
                      what=str(directory / "trainable.safetensors"))


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


def load_engine_state(checkpoint: Path, engine: Any, *, trust: bool = False) -> None:
    """DeepSpeed's optimizer, scheduler and counters (the checkpoint was verified first, and its
    files are loaded without unpickling code: :func:`safe_torch_load`)."""
    # The module part of DeepSpeed's checkpoint holds only the trainable weights (saved with
    # exclude_frozen_parameters), so DeepSpeed's strict check would flag every frozen base weight.
    # Those trainable weights were already loaded and checked key by key and shape by shape by
    # load_trainable_weights against the sha256 manifest; this call restores optimizer state.
    with safe_torch_load(trust=trust):
        path, _ = engine.load_checkpoint(str(checkpoint), tag=DS_TAG, load_module_strict=False,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointMismatchError(f"{checkpoint / DS_TAG}: DeepSpeed found no checkpoint to load")


def trim_metrics(output_dir: Path, step: int) -> None:
    """Drop ``metrics.jsonl`` lines past ``step`` (a resumed run writes them again), and the end-of-run
    summary line at ``step`` (a run resumed at its end writes it again, rather than once per rerun)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            at = entry.get("step", 0)
            if at < step or (at == step and "skipped_records" not in entry):
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def discard_checkpoints(output_dir: Path) -> int:
    """Remove the checkpoints of an earlier run (``resume: never``); returns how many."""
    found = list_checkpoints(output_dir)
    for path in found:
        _remove(path)
    (checkpoint_root(output_dir) / LATEST).unlink(missing_ok=True)
    return len(found)


# -- resuming ------------------------------------------------------------------------------------------------
@attrs.define
class Resume:
    """A checkpoint chosen to resume from, and how."""

    checkpoint: Path
    mode: str  # "exact" or "reset_optimizer"
    saved: dict[str, Any]
    notes: list[str]
    trust: bool = False  # --trust-checkpoint: DeepSpeed's files may be fully unpickled

    @property
    def step(self) -> int:
        return int(self.saved["step"])

    def before_engine(self, assembled: Any) -> None:
        """With a reset optimizer, the weights come from the gathered safetensors (any process count)."""
        if self.mode == "reset_optimizer":
            load_trainable_weights(self.checkpoint, assembled)

    def after_engine(self, engine: Any, scheduler: Any, *, rank: int, seed: int) -> TrainState:
        """Restore DeepSpeed's state (or the schedule alone), this process's RNG and the data position."""
        if self.mode == "exact":
            load_engine_state(self.checkpoint, engine, trust=self.trust)
        else:
            scheduler.load_state_dict(self.saved["scheduler"])
            optimizer = getattr(engine, "basic_optimizer", None) or engine.optimizer
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
            engine.global_steps = self.step
        if not load_rng(self.checkpoint, rank):
            # a process the checkpoint did not have (more processes now): a fresh, reproducible stream
            import numpy as np
            import torch

            derived = (seed * 1_000_003 + rank * 7919 + self.step) % 2**32
            torch.manual_seed(derived)
            np.random.seed(derived)
            random.seed(derived)
        return TrainState(**{f.name: int(self.saved[f.name]) for f in attrs.fields(TrainState)})


def plan_resume(*, resume: str, output_dir: Path, config: dict[str, Any], world_size: int, geometry: dict[str, int],
                trainable: dict[str, list[int]], on_world_size_change: str, rank: int,
                console: Any = None, trust: bool = False) -> Resume | None:
    """Pick the checkpoint to resume from (every process must call this), or ``None`` to start over."""
    if resume == "never":
        if rank == 0:
            dropped = start_over(output_dir)
            if dropped and console is not None:
                console.print(f"resume: never: removed {' and '.join(dropped)} of an earlier run in {output_dir}")
        dist_util.barrier()
        return None
    candidates, explicit = resume_candidates(resume, output_dir)
    chosen = choose_checkpoint(candidates, explicit, rank=rank, console=console)
    if chosen is None:
        return None
    saved = read_state(chosen)
    mode, notes = check_resumable(saved, config=config, world_size=world_size, geometry=geometry, trainable=trainable,
                                  on_world_size_change=on_world_size_change)
    return Resume(chosen, mode, saved, notes, trust)


def start_over(output_dir: Path) -> list[str]:
    """``resume: never``: remove an earlier run's checkpoints and model (a model left beside a new
    run's config and data would be silently wrong); returns what was removed, in words."""
    dropped = discard_checkpoints(output_dir)
    removed = [f"{dropped} checkpoint(s)"] if dropped else []
    model = Path(output_dir) / "model"
    if model.exists():
        _remove(model)
        removed.append("the model")
    (Path(output_dir) / "eval.json").unlink(missing_ok=True)
    return removed

"""Writing a checkpoint atomically from every process, and reading its weights and engine state back.

Every process writes into ``.step-NNNNNNNN.tmp``; once all of them report success, rank 0 writes
the manifest and renames the directory into place, so a checkpoint directory either is complete
or does not exist. A kill or a full disk during a save leaves the previous checkpoint untouched
(failures inside DeepSpeed's writers are held back until every process has finished its part, so
nobody is left waiting in a collective). Only the newest ``keep_last`` checkpoints are kept.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import attrs

from mmkit.atomic import atomic_write_text, swap_in
from mmkit.errors import CheckpointMismatchError
from mmkit.training import distributed as dist_util
from mmkit.training.checkpoint.layout import (
    DS_TAG, FORMAT, LATEST, STATE, TrainState, checkpoint_root, json_safe, list_checkpoints, remove_dir, step_name,
)
from mmkit.training.checkpoint.manifest import write_manifest
from mmkit.training.checkpoint.rng import write_rng
from mmkit.training.checkpoint.safe_load import safe_torch_load
from mmkit.training.faults import (
    TrainingError,
    describe_storage_error,
    inject_save_fault,
    is_storage_error,
    storage_fills,
)


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
    _attempt(failures, write_rng, tmp, rank, state.step)
    # 4. every process agrees before anything becomes visible
    problems = _agree(failures)
    if problems:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(output_dir, name, problems)
    if rank == 0:
        record = {**run_info, "format": FORMAT, **attrs.asdict(state), "saved_at": time.time()}
        _publish(tmp, final, record, state.step, failures)
    problems = _agree(failures)
    if problems:
        raise _write_failed(output_dir, name, problems)
    if rank == 0:
        _point_latest_and_prune(output_dir, name, keep_last)
    dist_util.barrier()
    return final


def _publish(tmp: Path, final: Path, record: dict[str, Any], step: int, failures: list[str]) -> None:
    """(rank 0) The trainer state, the manifest last, then the directory swapped in; a failure removes it."""
    _attempt(failures, lambda: (tmp / STATE).write_text(json.dumps(json_safe(record), indent=1, sort_keys=True),
                                                        encoding="utf-8"))
    _attempt(failures, write_manifest, tmp, step, _model_hashes(tmp / "model"))
    if not failures:
        _attempt(failures, swap_in, tmp, final)
    if failures:
        shutil.rmtree(tmp, ignore_errors=True)


def _point_latest_and_prune(output_dir: Path, name: str, keep_last: int) -> None:
    """(rank 0) ``latest`` names the new checkpoint; only the newest ``keep_last`` are kept."""
    try:
        atomic_write_text(checkpoint_root(output_dir) / LATEST, name + "\n")
    except OSError:
        pass  # a convenience pointer; resuming scans the directories themselves
    for old in list_checkpoints(output_dir)[max(1, keep_last):]:
        remove_dir(old)


def _model_hashes(model_dir: Path) -> dict[str, str]:
    """The weights' sha256 that ``write_model_files`` recorded in ``mmkit.json`` as it wrote them, by
    path in the checkpoint: the manifest reuses them instead of reading the files a second time."""
    from mmkit.modeling.persistence import META

    weights = json.loads((model_dir / META).read_text(encoding="utf-8"))["weights"]
    return {f"{model_dir.name}/{name}": entry["sha256"] for name, entry in weights.items()}


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


def load_trainable_weights(checkpoint: Path, assembled: Any) -> None:
    """The gathered trainable weights into a model not yet wrapped by DeepSpeed."""
    from mmkit.modeling.persistence import load_state_strict, load_weights, read_meta

    directory = checkpoint / "model"
    meta = read_meta(directory)
    load_state_strict(assembled.model, load_weights(directory, "trainable.safetensors", meta),
                      what=str(directory / "trainable.safetensors"))


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

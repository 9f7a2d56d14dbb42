"""Choosing the checkpoint to resume from (the newest one every process finds intact) and restoring
it; ``resume: never`` starts over."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from mmkit.atomic import atomic_write_text
from mmkit.errors import CheckpointMismatchError, ConfigError
from mmkit.training import distributed as dist_util
from mmkit.training.checkpoint.compat import check_resumable
from mmkit.training.checkpoint.layout import (
    MANIFEST, TrainState, discard_checkpoints, list_checkpoints, read_state, remove_dir,
)
from mmkit.training.checkpoint.manifest import verify
from mmkit.training.checkpoint.rng import load_rng, seed_fresh
from mmkit.training.checkpoint.store import load_engine_state, load_trainable_weights
from mmkit.training.logs import log


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


def choose_checkpoint(candidates: list[Path], explicit: bool, *, rank: int) -> Path | None:
    """The newest candidate every process finds intact (every process must call this); process 0
    logs each one passed over."""
    candidates = dist_util.broadcast_object([str(c) for c in candidates])
    for candidate in map(Path, candidates):
        problem = verify(candidate, rank)
        if dist_util.all_true(problem is None):
            return candidate
        problems = dist_util.all_gather_objects(problem)
        why = "; ".join(f"process {r}: {p}" for r, p in enumerate(problems) if p)
        if explicit and len(candidates) == 1:
            raise CheckpointMismatchError(f"checkpoint {candidate} failed verification: {why}")
        if rank == 0:
            log.warning("checkpoint %s failed verification (%s); trying an older one", candidate, why)
    if candidates:
        raise CheckpointMismatchError("no intact checkpoint under "
                                      f"{Path(candidates[0]).parent}: every candidate failed verification "
                                      "(resume: never starts over)")
    return None


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
        configured = Hyperparameters.of(scheduler)
        if self.mode == "exact":
            load_engine_state(self.checkpoint, engine, trust=self.trust)
        else:
            scheduler.load_state_dict(self.saved["scheduler"])
            engine.global_steps = self.step
        configured.restore(scheduler)
        if not load_rng(self.checkpoint, rank):
            # a process the checkpoint did not have (more processes now): a fresh, reproducible stream
            seed_fresh(seed, rank, self.step)
        return TrainState(**{f.name: int(self.saved[f.name]) for f in attrs.fields(TrainState)})


@attrs.frozen
class Hyperparameters:
    """The base learning rate and weight decay this run's configuration gives each parameter group.

    Loading a checkpoint brings back the ones it was saved with (the optimizer's param groups, the
    schedule's base rates). ``lr``, ``projector_lr``, ``weight_decay`` and the schedule's length may
    change on resume (the change is reported), so they are put back after loading."""

    base_lrs: tuple[float, ...]
    weight_decays: tuple[Any, ...]

    @classmethod
    def of(cls, scheduler: Any) -> Hyperparameters:
        """Read before loading, from the schedule and optimizer built from this run's configuration."""
        return cls(tuple(scheduler.base_lrs), tuple(g.get("weight_decay") for g in scheduler.optimizer.param_groups))

    def restore(self, scheduler: Any) -> None:
        """Each group's rate from this run's base rate and schedule at the restored step (unchanged
        options give the very values the checkpoint holds)."""
        groups = scheduler.optimizer.param_groups
        if not len(groups) == len(scheduler.base_lrs) == len(self.base_lrs):
            raise CheckpointMismatchError(f"the checkpoint's optimizer has {len(scheduler.base_lrs)} parameter "
                                          f"group(s), this run {len(self.base_lrs)}")
        lambdas = getattr(scheduler, "lr_lambdas", None)  # LambdaLR: our warmup + cosine schedule
        last = scheduler.get_last_lr()
        for i, group in enumerate(groups):
            loaded = scheduler.base_lrs[i]
            factor = lambdas[i](scheduler.last_epoch) if lambdas else (last[i] / loaded if loaded else 0.0)
            group["lr"] = self.base_lrs[i] * factor
            group["initial_lr"] = self.base_lrs[i]
            if self.weight_decays[i] is not None:
                group["weight_decay"] = self.weight_decays[i]
        scheduler.base_lrs = list(self.base_lrs)
        scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports until the next step


def plan_resume(*, resume: str, output_dir: Path, config: dict[str, Any], world_size: int, geometry: dict[str, int],
                trainable: dict[str, list[int]], on_world_size_change: str, rank: int,
                trust: bool = False) -> Resume | None:
    """Pick the checkpoint to resume from (every process must call this), or ``None`` to start over."""
    if resume == "never":
        if rank == 0:
            dropped = start_over(output_dir)
            if dropped:
                log.info("resume: never: removed %s of an earlier run in %s", " and ".join(dropped), output_dir)
        dist_util.barrier()
        return None
    candidates, explicit = resume_candidates(resume, output_dir)
    chosen = choose_checkpoint(candidates, explicit, rank=rank)
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
        remove_dir(model)
        removed.append("the model")
    (Path(output_dir) / "eval.json").unlink(missing_ok=True)
    return removed


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

"""Whether a checkpoint may be resumed by this run, and how: the options that must match (each
TrainConfig field declares its rule), the global batch, the data, the trainable parameters and the
process count."""

from __future__ import annotations

from typing import Any

from mmkit.errors import CheckpointMismatchError
from mmkit.training.checkpoint.layout import json_safe
from mmkit.training.config import IGNORED, MAY_CHANGE, MUST_MATCH, fields_with_rule


#: Options that must match for a resumed run to continue the same training (model, data, order). Each
#: TrainConfig field declares its rule (``resume=`` in config.py); zero_stage is quiet: see the
#: process-count note.
RESUME_STRICT = fields_with_rule(MUST_MATCH)
#: Options that may change (a longer schedule, another learning rate); a change is reported.
RESUME_REPORTED = fields_with_rule(MAY_CHANGE)
#: Never reported (they do not change what is trained).
RESUME_QUIET = fields_with_rule(IGNORED)


def check_same_run(saved: dict[str, Any], config: dict[str, Any]) -> None:
    """Raise when the checkpoint's options that must match (``RESUME_STRICT``) differ from ``config``."""
    saved_config = saved.get("config", {})
    now = json_safe(config)
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
    _check_batches(saved, geometry, world_size)
    _check_trainable(saved.get("trainable", {}), trainable)
    notes = changed_options(saved, config)
    mode, note = _process_change(saved, config, world_size, on_world_size_change)
    return mode, notes + ([note] if note else [])


def changed_options(saved: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """A note per option that may change on resume (``RESUME_REPORTED``) and did."""
    saved_config, now = saved.get("config", {}), json_safe(config)
    return [f"{k} changed: checkpoint {saved_config.get(k)!r}, now {now.get(k)!r}" for k in sorted(RESUME_REPORTED)
            if k in now and saved_config.get(k) != now.get(k)]


def _check_batches(saved: dict[str, Any], geometry: dict[str, int], world_size: int) -> None:
    """The data position is counted in global batches of the same records."""
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


def _check_trainable(saved_trainable: dict[str, Any], trainable: dict[str, list[int]]) -> None:
    """The same trainable parameters by name and shape."""
    if saved_trainable == trainable:
        return
    missing = sorted(set(trainable) - set(saved_trainable))
    extra = sorted(set(saved_trainable) - set(trainable))
    shapes = sorted(k for k in set(trainable) & set(saved_trainable) if trainable[k] != saved_trainable[k])
    parts = ([f"not in the checkpoint: {', '.join(missing[:4])}"] if missing else []) + \
            ([f"only in the checkpoint: {', '.join(extra[:4])}"] if extra else []) + \
            [f"{k}: checkpoint {saved_trainable[k]}, model {trainable[k]}" for k in shapes[:4]]
    raise CheckpointMismatchError("the trainable parameters differ from the checkpoint's (" + "; ".join(parts) + ")")


def _process_change(saved: dict[str, Any], config: dict[str, Any], world_size: int,
                    on_world_size_change: str) -> tuple[str, str | None]:
    """``(mode, note)`` for another process count or ZeRO stage than the checkpoint's."""
    saved_world, saved_stage = saved.get("world_size"), saved.get("zero_stage")
    stage_now = config.get("zero_stage")
    if saved_world == world_size and saved_stage == stage_now:
        return "exact", None
    change = f"{saved_world} process(es) with ZeRO stage {saved_stage} -> {world_size} with stage {stage_now}"
    if saved_stage == 0 and stage_now == 0:
        return "exact", (f"{change}: the optimizer state is not partitioned, so training continues with the same "
                         "global batches (results equal up to the order of floating-point sums)")
    if on_world_size_change == "reset_optimizer":
        return "reset_optimizer", (f"{change}: restoring the trainable weights, schedule, RNG and data position; the "
                                   "optimizer moments start again from zero (on_world_size_change: reset_optimizer)")
    raise CheckpointMismatchError(
        f"the checkpoint was written by {saved_world} process(es) with ZeRO stage {saved_stage}; this run has "
        f"{world_size} with stage {stage_now}. ZeRO partitions the optimizer state per process, so it "
        f"cannot be loaded as it is. Resume with --num-procs {saved_world} --zero-stage {saved_stage} for an "
        "exact continuation, or set on_world_size_change: reset_optimizer to keep the weights, schedule and data "
        "position and restart the optimizer moments")

"""The optimisation loop: micro-batches -> DeepSpeed steps, with logging, checkpoints and faults.

Every process runs the same number of forward/backward passes and takes the same decisions (skip a
step, stop, save), so collectives always pair up: a micro-batch whose records all failed to load
still runs (a kept earlier batch, with its loss times zero), and a non-finite loss anywhere skips
the step everywhere.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from mmkit.training import distributed as dist_util
from mmkit.training.checkpoint import TrainState
from mmkit.training.faults import (
    MAX_CONSECUTIVE_NONFINITE,
    StepGate,
    TrainingError,
    collective_failure_error,
    inject_process_faults,
    injected,
    is_collective_failure,
    is_out_of_memory,
    is_storage_error,
    out_of_memory_error,
    storage_error,
    storage_fills,
)
from mmkit.training.metrics_log import batch_slots, window_rates


def forward_batch(engine: Any, batch: dict[str, Any], dev: Any) -> Any:
    """One forward pass of the DeepSpeed engine on a collated batch."""
    from mmkit.data.batching import in_batch, model_inputs  # packed/cached batches add their own keys
    from mmkit.errors import PluginError

    try:
        return engine(**model_inputs(batch, dev))
    except PluginError as exc:  # an encoder fault: also name the records it met
        raise in_batch(exc, batch) from exc


def _stand_in_batch(loader: Any) -> dict[str, Any]:
    """A batch to run with zero weight when this process's micro-batch lost all its records."""
    from mmkit.data.batching import Skipped

    dataset = loader.dataset
    for index in range(len(dataset)):
        item = dataset[index]
        if not isinstance(item, Skipped):
            batch = loader.collate_fn([item])
            finish = getattr(loader, "finish", None)  # mmkit.data.batching.Batches: cached features etc.
            return finish(batch) if finish is not None else batch
    raise TrainingError("every training record failed to load")


def train_loop(cfg: Any, engine: Any, loader: Any, sampler: Any, scheduler: Any, log: Any, *, total_steps: int,
               state: TrainState, console: Any, is_main: bool, dev: Any, rank: int, world: int,
               save: Callable[[TrainState], str], last_checkpoint: str | None = None,
               forward: Callable[[Any, dict[str, Any], Any], Any] = forward_batch) -> dict[str, Any]:
    """Train from ``state`` to ``total_steps``; ``save(state)`` writes a checkpoint (every process calls it)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                        console=console, disable=not is_main, transient=False)
    gate = StepGate(engine)
    start_step = state.step
    tokens_window, slots_window, loss_window, loss_count = 0, 0, 0.0, 0
    run_tokens, last_loss = 0, float("nan")
    window_nonfinite: list[str] = []  # "value (records)" of this step's non-finite micro-batches
    consecutive_nonfinite = 0
    stand_in: dict[str, Any] | None = None
    micro = 0
    start = window_start = time.perf_counter()
    engine.train()
    try:
        with progress:
            task = progress.add_task("train", total=total_steps, completed=state.step, loss=float("nan"), tps=0.0)
            while state.step < total_steps:
                sampler.set_epoch(state.epoch, state.step_in_epoch)
                generator = getattr(loader, "generator", None)
                if generator is not None:  # worker seeds depend on the epoch only, not on where a run resumed
                    generator.manual_seed(cfg.seed * 1_000_003 + state.epoch)
                epoch_done, yielded = False, False
                for batch in loader:
                    yielded = True
                    step_now = state.step + 1
                    if micro == 0:
                        inject_process_faults(step_now, rank)
                    weight = 1.0
                    if batch.get("empty"):
                        batch, weight = stand_in or _stand_in_batch(loader), 0.0
                    else:
                        stand_in = batch
                    out = forward(engine, batch, dev)
                    loss = out.loss if weight == 1.0 else out.loss * weight
                    if micro == 0 and injected("nan", step_now, rank):
                        loss = loss * float("nan")
                    value = float(loss.detach())
                    finite = math.isfinite(value)
                    if not finite:
                        window_nonfinite.append(f"loss {value} on process {rank}, records "
                                                f"{', '.join(map(str, batch.get('ids', [])[:8]))}"
                                                f"{' ...' if len(batch.get('ids', [])) > 8 else ''}")
                    engine.backward(loss)
                    boundary = engine.is_gradient_accumulation_boundary()
                    skip = False
                    if boundary:
                        skip = dist_util.any_true(bool(window_nonfinite)) if world > 1 else bool(window_nonfinite)
                        if skip and cfg.on_nonfinite_loss == "stop":
                            raise _nonfinite_stop(step_now, state, window_nonfinite, last_checkpoint)
                        gate.skip = skip
                    engine.step()
                    gate.skip = False
                    if finite and weight > 0:
                        tokens_window += batch["num_tokens"]
                        slots_window += batch_slots(batch)
                        run_tokens += batch["num_tokens"]
                        loss_window += value
                        loss_count += 1
                    micro += 1
                    if not boundary:
                        continue
                    micro = 0
                    state.step += 1
                    state.step_in_epoch += 1
                    if state.step_in_epoch >= sampler.steps_per_epoch:
                        state.epoch += 1
                        state.step_in_epoch = 0
                        epoch_done = True
                    if skip:
                        state.nonfinite_steps += 1
                        consecutive_nonfinite += 1
                        notes = dist_util.all_gather_objects(window_nonfinite) if world > 1 else [window_nonfinite]
                        if is_main:
                            console.print(f"[yellow]step {state.step}: non-finite loss, update skipped "
                                          f"({'; '.join(n for ns in notes for n in ns)})[/]")
                        if consecutive_nonfinite >= MAX_CONSECUTIVE_NONFINITE:
                            raise TrainingError(
                                f"{consecutive_nonfinite} steps in a row up to step {state.step} had a non-finite "
                                "loss: the weights have most likely diverged. Lower the learning rate (or use fp32 / "
                                "bf16 instead of fp16) and resume from the last checkpoint "
                                f"({last_checkpoint or 'none'})")
                    else:
                        consecutive_nonfinite = 0
                    window_nonfinite = []
                    if state.step % cfg.log_every == 0 or state.step == total_steps:
                        elapsed = time.perf_counter() - window_start
                        loss_sum, count, tokens, slots = dist_util.all_reduce_sum(
                            [loss_window, loss_count, tokens_window, slots_window])
                        state.tokens += int(tokens)
                        last_loss = loss_sum / count if count else float("nan")
                        rates = window_rates(tokens, slots, elapsed)  # sums over the window, all processes
                        tps = rates["tokens_per_s"]
                        values = {"loss": last_loss, "lr": scheduler.get_last_lr()[-1], **rates, "epoch": state.epoch,
                                  "nonfinite_steps": state.nonfinite_steps, "elapsed_s": time.perf_counter() - start}
                        try:
                            with storage_fills("full_in_log", state.step, rank):
                                log.log(state.step, values)
                        except Exception as exc:  # JSONL or TensorBoard: a full disk is named, not a traceback
                            if not is_storage_error(exc):
                                raise
                            raise storage_error(exc, what=f"the metrics of step {state.step} (metrics.jsonl, "
                                                "TensorBoard)", last_checkpoint=last_checkpoint) from None
                        progress.update(task, loss=last_loss, tps=tps)
                        tokens_window, slots_window, loss_window, loss_count = 0, 0, 0.0, 0
                        window_start = time.perf_counter()
                    if cfg.save_every and state.step % cfg.save_every == 0 and state.step < total_steps:
                        last_checkpoint = save(state)
                    progress.update(task, completed=state.step)
                    if state.step >= total_steps or epoch_done:
                        break
                if not yielded:
                    raise TrainingError(f"the data loader produced no batch for epoch {state.epoch} from step "
                                        f"{state.step_in_epoch} of {sampler.steps_per_epoch}")
    except TrainingError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise out_of_memory_error(exc, step=state.step + 1, cfg=cfg, device=dev) from exc
        if world > 1 and is_collective_failure(exc):
            raise collective_failure_error(exc, rank=rank, world=world, step=state.step + 1,
                                           timeout_s=cfg.collective_timeout_s, last_checkpoint=last_checkpoint) from exc
        raise
    elapsed = time.perf_counter() - start
    run_tokens_all = dist_util.all_reduce_sum([run_tokens])[0]
    summary = {"steps": state.step, "steps_this_run": state.step - start_step, "final_loss": last_loss,
               "tokens_per_s": run_tokens_all / max(elapsed, 1e-9), "train_seconds": elapsed,
               "nonfinite_steps": state.nonfinite_steps}
    if getattr(dev, "type", "cpu") == "cuda":
        import torch

        summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        log.log(state.step, {"peak_memory_gib": summary["peak_memory_gib"]})
    return summary


def _nonfinite_stop(step: int, state: TrainState, notes: list[str], last_checkpoint: str | None) -> TrainingError:
    everywhere = dist_util.all_gather_objects(notes)
    detail = "; ".join(n for ns in everywhere for n in ns)
    return TrainingError(
        f"non-finite loss at step {step} (epoch {state.epoch}, step {state.step_in_epoch + 1} of the epoch): {detail}. "
        "No update was applied. Check those records, lower the learning rate, or set on_nonfinite_loss: skip to "
        f"skip such steps; the last checkpoint is {last_checkpoint or 'none (nothing saved yet)'}")

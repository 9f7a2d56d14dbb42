"""The optimisation loop: micro-batches -> optimizer steps, with logging, checkpoints and fault policies.

Every process runs the same number of forward/backward passes and takes the same decisions (skip a
step, stop, save), so collectives always pair up: a micro-batch whose records all failed to load
still runs (a kept earlier batch, with its loss times zero), and the faults of a step (a non-finite
loss; an out-of-memory micro-batch under ``on_out_of_memory: skip``) are agreed in one all-reduce at
the step's boundary (:func:`mmkit.training.faults.agree`), after which each policy decides.

:class:`Trainer` drives any engine with DeepSpeed's interface: DeepSpeed's own, or
:class:`mmkit.training.optim.PlainEngine` where DeepSpeed adds nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import attrs

from mmkit.training import distributed as dist_util
from mmkit.training.checkpoint import TrainState
from mmkit.training.config import TrainConfig
from mmkit.training.faults import (
    Agreed,
    CollectiveFailurePolicy,
    NonFinitePolicy,
    OutOfMemoryPolicy,
    StepFaults,
    StepGate,
    TrainingError,
    agree,
    gather_notes,
    inject_process_faults,
    injected,
    is_out_of_memory,
    is_storage_error,
    storage_error,
    storage_fills,
)
from mmkit.training.logs import TrainProgress, log
from mmkit.training.metrics_log import window_rates


def forward_batch(engine: Any, batch: Any, dev: Any) -> Any:
    """One forward pass of the engine on a collated batch."""
    from mmkit.data.batching import in_batch, model_inputs  # packed/cached batches add their own keys
    from mmkit.errors import PluginError

    try:
        return engine(**model_inputs(batch, dev))
    except PluginError as exc:  # an encoder fault: also name the records it met
        raise in_batch(exc, batch) from exc


# -- what the loop reads from a batch (mmkit.data.batch.Batch) ----------------------------------------------------
def _is_empty(batch: Any) -> bool:
    return batch.is_empty


def _ids(batch: Any) -> list[Any]:
    return list(batch.ids)


def _num_tokens(batch: Any) -> int:
    return int(batch.num_tokens)


def _num_slots(batch: Any) -> int:
    """Token positions the micro-batch computes on, padding included."""
    return int(batch.num_slots)


def _records(batch: Any) -> str:
    ids = _ids(batch)
    return f"{', '.join(map(str, ids[:8]))}{' ...' if len(ids) > 8 else ''}"


@attrs.frozen
class Process:
    """Where this trainer runs: its rank among ``world`` processes, and its device."""

    rank: int = 0
    world: int = 1
    device: Any = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@attrs.define
class Window:
    """Sums over the micro-batches since the last logged step (all finite, full-weight ones)."""

    tokens: int = 0
    slots: int = 0
    loss: float = 0.0
    count: int = 0
    start: float = attrs.field(factory=lambda: time.perf_counter())


class Trainer:
    """Trains ``engine`` on ``loader`` (batches in ``sampler``'s order) until ``total_steps``.

    :meth:`run` loops over epochs; :meth:`micro_batch` is one forward/backward (and the engine's step);
    at a step's last micro-batch :meth:`decide` agrees on its faults before the update (skip it, or
    stop), and :meth:`boundary` then counts, logs and saves. ``save(state)`` writes a checkpoint
    (every process calls it) and returns its path.
    """

    def __init__(self, cfg: TrainConfig, engine: Any, loader: Any, sampler: Any, scheduler: Any, metrics: Any, *,
                 process: Process, save: Callable[[TrainState], str],
                 forward: Callable[[Any, Any, Any], Any] = forward_batch):
        self.cfg, self.engine, self.loader, self.sampler = cfg, engine, loader, sampler
        self.scheduler, self.metrics, self.process = scheduler, metrics, process
        self._save, self.forward = save, forward
        self.nonfinite = NonFinitePolicy(cfg.on_nonfinite_loss)
        self.out_of_memory = OutOfMemoryPolicy(cfg.on_out_of_memory, cfg=cfg, device=process.device)
        self.collective = CollectiveFailurePolicy(rank=process.rank, world=process.world,
                                                  timeout_s=cfg.collective_timeout_s)
        self.gate = StepGate(engine)
        self.faults = StepFaults()
        self.last_checkpoint: str | None = None
        self.last_loss = float("nan")
        self.run_tokens = 0
        self._stand_in: Any = None
        self._micro = 0
        self.started = time.perf_counter()
        self.agreed = Agreed(nonfinite=False, out_of_memory=False)  # set at every boundary

    # -- the run -------------------------------------------------------------------------------------------
    def run(self, state: TrainState, total_steps: int, *, last_checkpoint: str | None = None) -> dict[str, Any]:
        """Train from ``state`` to ``total_steps``; returns the run's summary."""
        self.state, self.total_steps, self.last_checkpoint = state, total_steps, last_checkpoint
        start_step = state.step
        self.window = Window()
        start = self.started = time.perf_counter()
        self.engine.train()
        try:
            with TrainProgress(total_steps, state.step, enabled=self.process.is_main) as self.progress:
                while state.step < total_steps:
                    self.epoch()
        except TrainingError:
            raise
        except Exception as exc:
            # OOM under ``stop`` (or when skipping it cannot recover) and broken collectives end here
            if is_out_of_memory(exc):
                raise self.out_of_memory.error(exc, step=state.step + 1) from exc
            error = self.collective.error(exc, step=state.step + 1, last_checkpoint=self.last_checkpoint)
            if error is not None:
                raise error from exc
            raise
        elapsed = time.perf_counter() - start
        run_tokens_all = dist_util.all_reduce_sum([self.run_tokens])[0]
        summary = {"steps": state.step, "steps_this_run": state.step - start_step, "final_loss": self.last_loss,
                   "tokens_per_s": run_tokens_all / max(elapsed, 1e-9), "train_seconds": elapsed,
                   "nonfinite_steps": state.nonfinite_steps, "oom_skipped_steps": self.out_of_memory.skipped_steps}
        if getattr(self.process.device, "type", "cpu") == "cuda":
            import torch

            summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.process.device) / 2**30
            self.metrics.log(state.step, {"peak_memory_gib": summary["peak_memory_gib"]})
        return summary

    def epoch(self) -> None:
        """The rest of the current epoch (or up to ``total_steps``)."""
        state = self.state
        self.sampler.set_epoch(state.epoch, state.step_in_epoch)
        generator = getattr(self.loader, "generator", None)
        if generator is not None:  # worker seeds depend on the epoch only, not on where a run resumed
            generator.manual_seed(self.cfg.seed * 1_000_003 + state.epoch)
        epoch = state.epoch
        yielded = False
        for batch in self.loader:
            yielded = True
            if self.micro_batch(batch) and (state.step >= self.total_steps or state.epoch != epoch):
                break
        if not yielded:
            raise TrainingError(f"the data loader produced no batch for epoch {state.epoch} from step "
                                f"{state.step_in_epoch} of {self.sampler.steps_per_epoch}")

    # -- one micro-batch -----------------------------------------------------------------------------------
    def micro_batch(self, batch: Any) -> bool:
        """Forward and backward on ``batch`` (and the optimizer step at a boundary); whether a step ended."""
        step_now = self.state.step + 1
        weight = 1.0
        if _is_empty(batch):
            batch, weight = self._stand_in_batch(), 0.0
        else:
            self._stand_in = batch
        try:
            if self._micro == 0:
                inject_process_faults(step_now, self.process.rank)
            value = self._forward_backward(batch, weight, step_now)
        except Exception as exc:
            if not is_out_of_memory(exc) or not self.out_of_memory.recover(exc, step=step_now):
                raise
            # the micro-batch is dropped; a zero-weight stand-in keeps this process's collectives in step
            self.faults.out_of_memory.append(f"process {self.process.rank}: {str(exc).strip()[:200]}")
            batch, weight = self._stand_in_batch(), 0.0
            value = self._forward_backward(batch, weight, step_now)
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary:
            self.gate.skip = self.decide(step_now)
        self.engine.step()
        self.gate.skip = False
        if math.isfinite(value) and weight > 0:
            self.window.tokens += _num_tokens(batch)
            self.window.slots += _num_slots(batch)
            self.run_tokens += _num_tokens(batch)
            self.window.loss += value
            self.window.count += 1
        self._micro += 1
        if boundary:
            self._micro = 0
            self.boundary()
        return boundary

    def _forward_backward(self, batch: Any, weight: float, step_now: int) -> float:
        out = self.forward(self.engine, batch, self.process.device)
        loss = out.loss if weight == 1.0 else out.loss * weight
        if self._micro == 0 and injected("nan", step_now, self.process.rank):
            loss = loss * float("nan")
        value = float(loss.detach())
        if not math.isfinite(value):
            self.faults.nonfinite.append(f"loss {value} on process {self.process.rank}, records {_records(batch)}")
        self.engine.backward(loss)
        return value

    def _stand_in_batch(self) -> Any:
        """A batch to run with zero weight (this process's micro-batch lost all its records, or ran
        out of memory): the last full batch, else the smallest one record makes."""
        from mmkit.data.batching import Skipped

        if self._stand_in is not None and not self.faults.out_of_memory:
            return self._stand_in
        dataset = self.loader.dataset
        for index in range(len(dataset)):
            item = dataset[index]
            if not isinstance(item, Skipped):
                batch = self.loader.collate_fn([item])
                finish = getattr(self.loader, "finish", None)  # mmkit.data.batching.Batches: cached features etc.
                return finish(batch) if finish is not None else batch
        raise TrainingError("every training record failed to load")

    # -- the step's boundary -------------------------------------------------------------------------------
    def decide(self, step_now: int) -> bool:
        """Agree on this step's faults (one collective) and let each policy decide; whether to skip the update."""
        state = self.state
        agreed = agree(self.faults, self.process.world)
        self.agreed = agreed
        self.nonfinite.before_update(agreed, self.faults.nonfinite, world=self.process.world, step=step_now,
                                     epoch=state.epoch, step_in_epoch=state.step_in_epoch,
                                     last_checkpoint=self.last_checkpoint)
        return agreed.skip

    def boundary(self) -> None:
        """After the update (or the skipped one): counters, fault notes, metrics, checkpoint."""
        state, cfg = self.state, self.cfg
        state.step += 1
        state.step_in_epoch += 1
        if state.step_in_epoch >= self.sampler.steps_per_epoch:
            state.epoch += 1
            state.step_in_epoch = 0
        agreed = self.agreed
        if agreed.skip:
            if agreed.nonfinite:
                state.nonfinite_steps += 1
            notes = gather_notes(self.faults.nonfinite + self.faults.out_of_memory, self.process.world)
            why = " and ".join(w for w, on in (("non-finite loss", agreed.nonfinite),
                                               ("out of memory", agreed.out_of_memory)) if on)
            if self.process.is_main:
                log.warning("step %d: %s, update skipped (%s)", state.step, why, "; ".join(notes))
        self.nonfinite.after_skip(agreed, step=state.step, last_checkpoint=self.last_checkpoint)
        self.out_of_memory.after_skip(agreed, step=state.step)
        self.faults.clear()
        if state.step % cfg.log_every == 0 or state.step == self.total_steps:
            self.log_window()
        if cfg.save_every and state.step % cfg.save_every == 0 and state.step < self.total_steps:
            self.save()
        self.progress.advance(state.step)

    def log_window(self) -> None:
        state, window = self.state, self.window
        elapsed = time.perf_counter() - window.start
        loss_sum, count, tokens, slots = dist_util.all_reduce_sum([window.loss, window.count, window.tokens,
                                                                   window.slots])
        state.tokens += int(tokens)
        self.last_loss = loss_sum / count if count else float("nan")
        rates = window_rates(tokens, slots, elapsed)  # sums over the window, all processes
        values = {"loss": self.last_loss, "lr": self.scheduler.get_last_lr()[-1], **rates, "epoch": state.epoch,
                  "nonfinite_steps": state.nonfinite_steps, "elapsed_s": time.perf_counter() - self.started}
        if self.out_of_memory.mode == "skip":
            values["oom_skipped_steps"] = self.out_of_memory.skipped_steps
        try:
            with storage_fills("full_in_log", state.step, self.process.rank):
                self.metrics.log(state.step, values)
        except Exception as exc:  # JSONL or TensorBoard: a full disk is named, not a traceback
            if not is_storage_error(exc):
                raise
            raise storage_error(exc, what=f"the metrics of step {state.step} (metrics.jsonl, TensorBoard)",
                                last_checkpoint=self.last_checkpoint) from None
        self.progress.measured(state.step, self.last_loss, rates["tokens_per_s"])
        self.window = Window()

    def save(self) -> str:
        self.last_checkpoint = self._save(self.state)
        return self.last_checkpoint

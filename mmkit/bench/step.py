"""The training step, measured: mmkit's own loop (``mmkit.training.trainer.Trainer``, unchanged)
driven with timing wrappers around its loader, engine and log, and module hooks on the encoders
and projectors; and the plain LLaVA-style loop (``plain_loop.py``) under the same timers.

Each variant (padded = the defaults, online, cached, packed, grouped, stock, plain) runs ``steps``
optimizer steps per round and the rounds interleave the variants, so a change in the machine's load
hits all of them alike. The first step of every round is left out of the figures (it starts the
loader's worker).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

class Recorder:
    """Per-step wall time split into phases, plus the batch sizes each step consumed."""

    def __init__(self, device: torch.device):
        self.device = device
        self.steps: list[dict[str, float]] = []
        self.in_forward = False
        self._open: dict[str, float] = {}
        self._reset()
        self.mark = time.perf_counter()
        self.cpu_mark = time.process_time()

    def _reset(self) -> None:
        self.current = {"data": 0.0, "encoders": 0.0, "projectors": 0.0, "forward": 0.0, "backward": 0.0,
                        "optimizer": 0.0, "logging": 0.0, "samples": 0, "tokens": 0, "slots": 0}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def add(self, phase: str, seconds: float) -> None:
        self.current[phase] += seconds

    def batch(self, batch: Any) -> None:
        if isinstance(batch, dict):  # the plain loop's: what the spliced sequences hold (one slot per input)
            self.current["samples"] += len(batch["ids"])
            self.current["tokens"] += int(batch["num_tokens"])
            self.current["slots"] += int(batch["num_slots"])
            return
        if batch.is_empty:
            return
        self.current["samples"] += batch.samples
        self.current["tokens"] += batch.num_tokens
        self.current["slots"] += batch.num_slots

    def start_round(self) -> None:
        self._reset()
        self.mark = time.perf_counter()
        self.cpu_mark = time.process_time()

    def end_step(self) -> None:
        self.sync()
        now = time.perf_counter()
        step = dict(self.current)
        step["seconds"] = now - self.mark
        # this process's CPU time (loader workers are other processes): on a shared machine other
        # processes stretch the wall time, far less the CPU time a step needs
        cpu = time.process_time()
        step["cpu_seconds"], self.cpu_mark = cpu - self.cpu_mark, cpu
        self.steps.append(step)
        self.mark = now
        self._reset()

    def timed(self, phase: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.sync()
            self.add(phase, time.perf_counter() - start)

    def hook(self, module: torch.nn.Module, phase: str) -> list[Any]:
        """Time ``module``'s forward calls made inside a timed forward pass (not cache fills)."""
        key = f"{phase}:{id(module)}"

        def pre(_module: Any, _args: Any) -> None:
            if self.in_forward:
                self.sync()
                self._open[key] = time.perf_counter()

        def post(_module: Any, _args: Any, _out: Any) -> None:
            start = self._open.pop(key, None)
            if start is not None:
                self.sync()
                self.add(phase, time.perf_counter() - start)

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def hook_model(self, model: torch.nn.Module, modalities: Sequence[str]) -> list[Any]:
        """:meth:`hook` on every modality's encoder and projector."""
        return [h for m in modalities for part in ("encoders", "projectors")
                for h in self.hook(getattr(model, part)[m], part)]


class _LoaderView:
    """A training loader seen through a change to its batches (:meth:`_each`); every other attribute
    is the loader's, and the loader's iterator is closed however iteration ends."""

    def __init__(self, loader: Any):
        self._loader = loader

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._loader, name)

    def __iter__(self):
        source = iter(self._loader)
        try:
            yield from self._each(source)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def _each(self, source: Any) -> Any:
        raise NotImplementedError


class TimedLoader(_LoaderView):
    """The loop's loader, with the wait for each batch timed."""

    def __init__(self, batches: Any, rec: Recorder):
        super().__init__(batches)
        self._rec = rec

    def _each(self, source: Any) -> Any:
        while True:
            start = time.perf_counter()
            try:
                batch = next(source)
            except StopIteration:
                return
            self._rec.add("data", time.perf_counter() - start)
            self._rec.batch(batch)
            yield batch


class TimedEngine:
    """The DeepSpeed engine with ``backward`` and ``step`` timed; a step boundary closes a step record."""

    def __init__(self, engine: Any, rec: Recorder):
        self._engine, self._rec = engine, rec

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._engine, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._engine(*args, **kwargs)

    def backward(self, loss: Any) -> Any:
        return self._rec.timed("backward", lambda: self._engine.backward(loss))

    def step(self) -> Any:
        boundary = self._engine.is_gradient_accumulation_boundary()
        out = self._rec.timed("optimizer", self._engine.step)
        if boundary:
            self._rec.end_step()
        return out


class TimedLog:
    def __init__(self, log: Any, rec: Recorder):
        self._log, self._rec = log, rec

    def log(self, step: int, values: dict[str, Any]) -> None:
        self._rec.timed("logging", lambda: self._log.log(step, values))

    def close(self) -> None:
        self._log.close()


def timed_forward(rec: Recorder) -> Callable[[Any, dict[str, Any], Any], Any]:
    from mmkit.training.trainer import forward_batch

    def forward(engine: Any, batch: dict[str, Any], dev: Any) -> Any:
        rec.in_forward = True
        try:
            return rec.timed("forward", lambda: forward_batch(getattr(engine, "_engine", engine), batch, dev))
        finally:
            rec.in_forward = False

    return forward


# -- the rig: one model and engine, several loaders ---------------------------------------------------
@attrs.define
class Variant:
    name: str
    cfg: Any
    loader: Any
    sampler: Any
    state: Any
    rec: Recorder


@attrs.define
class Rig:
    cfg: Any
    host: Any
    assembled: Any
    samples: list[Any]
    modalities: tuple[str, ...]
    engine: Any
    scheduler: Any
    dev: torch.device
    param_groups: list[dict[str, Any]]
    log: Any
    root: Path
    variants: dict[str, Variant] = attrs.field(factory=dict)
    plain: Any = None
    plain_rec: Recorder | None = None
    plain_state: dict[str, int] = attrs.field(factory=lambda: {"epoch": 0, "step": 0})


def small_llm(out_dir: Path, tokenizer_dir: Path, *, vocab_size: int = 32000, hidden_size: int = 768,
              num_layers: int = 12, num_heads: int = 12, seed: int = 0) -> Path:
    """A ~110M-parameter LLaMA-architecture LM (LLaMA's 32,000-token vocabulary, tied embeddings,
    random init) with the demo's tokenizer, saved for ``from_pretrained``: the sizes where compute,
    not Python overhead, decides the step time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=max(vocab_size, len(tokenizer)), hidden_size=hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_heads, intermediate_size=hidden_size * 8 // 3,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def step_config(preset: str, root: Path, modalities: Sequence[str], host: Any) -> tuple[Any, Any]:
    """The training configuration the step is measured under, and its run plan: the demo's
    defaults (its thread count, batch, LoRA, workers) on the demo's data, with the demo LLM
    (``demo``) or a ~110M LLM (``small``, torch's default thread count: the compute-bound case)."""
    from mmkit.data.sources import DataSource
    from mmkit.demo.task import prepare_demo
    from mmkit.training.config import DEMO_DEFAULTS, resolve_config
    from mmkit.training.recipe import RunPlan
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard save bars are noise in a benchmark's output
    data = prepare_demo(host, modalities, root / "demo_data")
    base = {"modalities": list(modalities), "output_dir": str(root / preset), "tensorboard": False,
            "resume": "never", "log_every": DEMO_DEFAULTS["log_every"]}
    if preset == "demo":
        cfg, llm = resolve_config(None, base), data.llm_dir
    else:
        llm = small_llm(root / "small_llm", data.llm_dir)
        values = {k: v for k, v in DEMO_DEFAULTS.items() if k not in ("output_dir", "num_threads", "micro_batch_size")}
        cfg = resolve_config(None, {**values, **base, "llm": str(llm), "data": [str(data.train_file)],
                                    "micro_batch_size": 8})
    plan = RunPlan(llm=str(llm), modalities=tuple(modalities), train_sources=(DataSource(data.train_file),),
                   eval_sources={}, chance={})
    return cfg, plan


def build_rig(preset: str, root: Path, *, modalities: Sequence[str] | None = None, host: Any = None,
              max_samples: int | None = None, optimizer_step: str | None = None) -> Rig:
    """Everything ``mmkit.training.recipe.train`` builds before its loop: data, model, engine (the one
    training picks: ``recipe.make_engine``; ``optimizer_step`` overrides the configuration's choice)."""
    from mmkit.modeling.assemble import assemble, trainable_parameters
    from mmkit.plugins import get_host
    from mmkit.training import recipe
    from mmkit.modeling.loading import device
    from mmkit.training.distributed import init_distributed
    from mmkit.training.metrics_log import MetricsLog

    host = host or get_host()
    modalities = tuple(modalities or recipe.default_modalities(host))
    cfg, plan = step_config(preset, root, modalities, host)
    if optimizer_step is not None:
        cfg = attrs.evolve(cfg, optimizer_step=optimizer_step)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    init_distributed(cfg.collective_timeout_s)
    torch.manual_seed(cfg.seed)
    assembled = assemble(recipe.model_config(cfg, plan), host)
    model = assembled.model
    groups = trainable_parameters(model, cfg.stage)
    samples, _ = recipe.read_training_samples(cfg, plan, host, assembled)
    if max_samples is not None:
        samples = samples[:max_samples]
    param_groups = [{"params": groups.get("projectors", []) + groups.get("embeddings", []),
                     "lr": cfg.projector_lr or cfg.lr}]
    if "lora" in groups:
        param_groups.append({"params": groups["lora"], "lr": cfg.lr})
    horizon = 10**6  # the schedule's length does not change the step's cost
    engine, scheduler = recipe.make_engine(attrs.evolve(cfg, warmup_ratio=0.0), model, param_groups, world=1,
                                           total_steps=horizon)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out, tensorboard=False)
    return Rig(cfg, host, assembled, samples, modalities, engine, scheduler, device(), param_groups, log, root)


def add_variant(rig: Rig, name: str, **overrides: Any) -> Variant:
    """A loader over the rig's samples with other batching / cache settings (same model and engine)."""
    from mmkit.training import recipe
    from mmkit.training.checkpoint import TrainState

    cfg = attrs.evolve(rig.cfg, **overrides)
    loader, sampler, _ = recipe.build_loader(cfg, rig.host, rig.assembled, rig.samples, rig.modalities, rank=0,
                                             world=1)
    rec = Recorder(rig.dev)
    variant = Variant(name, cfg, loader, sampler, TrainState(), rec)
    rig.variants[name] = variant
    return variant


class StockInputs(_LoaderView):
    """A loader whose batches carry ``encoder.stock_input(inputs)`` for every encoder that offers it:
    the inputs without the weight-free work (sampling, grouping) its ``preprocess`` does ahead of the
    step, which its forward then does in every step, as a stock implementation would. The ``stock``
    variant runs mmkit's default step on these, so one run measures what moving that work bought."""

    def __init__(self, loader: Any, encoders: dict[str, Any]):
        super().__init__(loader)
        self._encoders = encoders

    def _each(self, source: Any) -> Any:
        for batch in source:
            if not batch.is_empty:
                batch.inputs = {m: self._encoders[m].stock_input(x).contiguous() if m in self._encoders else x
                                for m, x in batch.inputs.items()}
            yield batch


def stock_encoders(rig: Rig) -> dict[str, Any]:
    """The rig's encoders that offer ``stock_input`` (see :class:`StockInputs`)."""
    return {m: enc for m, enc in rig.assembled.model.encoders.items() if callable(getattr(enc, "stock_input", None))}


def online(rig: Rig) -> str:
    """The variant that encodes every step: ``online`` when the defaults cache features, else ``padded``."""
    return "online" if "online" in rig.variants else "padded"


def add_stock(rig: Rig) -> Variant:
    """The online configuration fed :class:`StockInputs`."""
    variant = add_variant(rig, "stock", cache_features=None)
    variant.loader = StockInputs(variant.loader, stock_encoders(rig))
    return variant


def add_plain(rig: Rig) -> None:
    from transformers import get_cosine_schedule_with_warmup

    from mmkit.bench.plain_loop import PlainLlavaLoop

    rig.plain = PlainLlavaLoop(rig.assembled.model, pad_id=rig.assembled.tokenizer.pad_token_id,
                               param_groups=rig.param_groups, weight_decay=rig.cfg.weight_decay,
                               max_grad_norm=rig.cfg.max_grad_norm, device=rig.dev, num_workers=rig.cfg.num_workers,
                               schedule=lambda opt: get_cosine_schedule_with_warmup(opt, 0, 10**6))
    rig.plain_rec = Recorder(rig.dev)


def run_variant(rig: Rig, name: str, steps: int) -> None:
    """``steps`` more optimizer steps of mmkit's loop on variant ``name``."""
    from mmkit.training.trainer import Process, Trainer

    v = rig.variants[name]
    rec = v.rec
    hooks = rec.hook_model(rig.assembled.model, rig.modalities)
    try:
        rec.start_round()
        trainer = Trainer(v.cfg, TimedEngine(rig.engine, rec), TimedLoader(v.loader, rec), v.sampler, rig.scheduler,
                          TimedLog(rig.log, rec), process=Process(0, 1, rig.dev), save=lambda _s: "",
                          forward=timed_forward(rec))
        trainer.run(v.state, v.state.step + steps)
    finally:
        for h in hooks:
            h.remove()


def run_plain(rig: Rig, steps: int) -> None:
    """``steps`` steps of the plain loop on the micro-batches the online variant draws next (its
    dataset's items carry the preprocessed inputs; a caching one's may hold features instead)."""
    rec, plain = rig.plain_rec, rig.plain
    assert rec is not None and plain is not None
    sampler = rig.variants[online(rig)].sampler
    batches = _next_batches(sampler, rig.plain_state, steps)
    hooks = rec.hook_model(rig.assembled.model, rig.modalities)
    dataset = rig.variants[online(rig)].loader.dataset
    try:
        rec.start_round()
        source = iter(plain.loader(dataset, batches))
        for _ in range(len(batches)):
            batch = rec.timed("data", lambda: next(source))
            rec.batch(batch)
            rec.in_forward = True
            try:
                loss = rec.timed("forward", lambda: plain.loss(batch))
            finally:
                rec.in_forward = False
            rec.timed("backward", loss.backward)
            rec.timed("optimizer", plain.update)
            rec.end_step()
    finally:
        for h in hooks:
            h.remove()


def _next_batches(sampler: Any, position: dict[str, int], count: int) -> list[list[int]]:
    out: list[list[int]] = []
    while len(out) < count:
        sampler.set_epoch(position["epoch"], position["step"])
        for indices in sampler:
            out.append(list(indices))
            position["step"] += 1
            if len(out) == count:
                break
        if position["step"] >= sampler.steps_per_epoch:
            position["epoch"] += 1
            position["step"] = 0
    return out


# -- figures -------------------------------------------------------------------------------------
def round_figures(rec: Recorder, steps_per_round: int, *, skip_first: int = 1) -> list[dict[str, float]]:
    """Per round: samples/s, real tokens/s, padded slots/s, padding fraction, and summed phases."""
    rounds = []
    for start in range(0, len(rec.steps), steps_per_round):
        chunk = rec.steps[start + skip_first:start + steps_per_round]
        if not chunk:
            continue
        total = {k: sum(s[k] for s in chunk) for k in chunk[0]}
        seconds = total["seconds"]
        rounds.append({
            "samples_per_s": total["samples"] / seconds, "tokens_per_s": total["tokens"] / seconds,
            "slots_per_s": total["slots"] / seconds, "padding": 1.0 - total["tokens"] / max(total["slots"], 1),
            "step_s": seconds / len(chunk), "cpu_step_s": total["cpu_seconds"] / len(chunk),
            "cpu_tokens_per_s": total["tokens"] / max(total["cpu_seconds"], 1e-9),
            **{f"t_{k}": total[k] for k in total},
        })
    return rounds


def phase_shares(rec: Recorder, steps_per_round: int, *, skip_first: int = 1) -> dict[str, float]:
    """Share of the measured wall time per phase (LLM forward = forward - encoders - projectors;
    other = what no timer covers: the loop's own bookkeeping, progress display)."""
    steps = [s for start in range(0, len(rec.steps), steps_per_round)
             for s in rec.steps[start + skip_first:start + steps_per_round]]
    total = sum(s["seconds"] for s in steps) or math.nan
    sums = {k: sum(s[k] for s in steps) for k in ("data", "encoders", "projectors", "forward", "backward",
                                                  "optimizer", "logging")}
    shares = {"data": sums["data"], "encoders": sums["encoders"], "projectors": sums["projectors"],
              "llm_forward": sums["forward"] - sums["encoders"] - sums["projectors"], "backward": sums["backward"],
              "optimizer": sums["optimizer"], "logging": sums["logging"]}
    shares["other"] = total - sum(shares.values())
    return {k: v / total for k, v in shares.items()}


def step_flops(rig: Rig, variant: str = "padded") -> tuple[float, int]:
    """FLOPs of one forward + backward on one batch (torch's FLOP counter: matmuls and attention),
    and that batch's padded token slots."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmkit.data.batching import model_inputs

    v = rig.variants[variant]
    v.sampler.set_epoch(0, 0)
    batch = next(iter(v.loader))
    model = rig.assembled.model
    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(**model_inputs(batch, rig.dev))
        out.loss.backward()
    for p in model.parameters():
        p.grad = None
    return float(counter.get_total_flops()), batch.num_slots

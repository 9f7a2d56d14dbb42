"""The training recipe: data -> assembled model -> engine -> Trainer -> saved model -> evaluation.

:func:`train` admits the run (its output directory is a transaction, ``rundir.py``); ``_train`` then
calls one stage per step, each a function below with one job: build the model, build the data,
choose the resume point, make the engine, open the metrics log, train, finish and evaluate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from mmkit.data.batching import (Batches, Collator, SampleDataset, Skipped, collate_fns, count_input_tokens,
                                 input_counters, make_preprocessor)
from mmkit.records import ReadContext, Sample
from mmkit.data.sources import DataSource, ignored_key_reason, read_mixture
from mmkit.errors import ConfigError, DataError, MmkitError
from mmkit.modeling.assemble import Assembled, ModalityChoice, ModelConfig, assemble, trainable_parameters
from mmkit.modeling.lora import LoraSettings
from mmkit.modeling.persistence import check_fingerprint, load_into, model_dir, read_meta, save_model
from mmkit.plugins import PluginHost, get_host
from mmkit.specs import resolve
from mmkit.training.checkpoint import Resume, TrainState, plan_resume, save_checkpoint, trim_metrics
from mmkit.training.config import TrainConfig, save_config
from mmkit.training.faults import TrainingError, is_storage_error, storage_error
from mmkit.modeling.loading import device
from mmkit.training.distributed import init_distributed
from mmkit.training.skipped import skipped_records, write_skipped
from mmkit.training import logs
from mmkit.training.logs import log
from mmkit.training.trainer import Process, Trainer
from mmkit.training.metrics_log import MetricsLog
from mmkit.training.optim import PlainEngine, accept_plain_checkpoints, use_plain_step
from mmkit.training.preflight import preflight
from mmkit.training.rundir import DEMO, Admission, RunLock, admit
from mmkit.data.sampler import GlobalBatchSampler, batch_geometry


@attrs.frozen
class RunPlan:
    """What a run works on, once the demo (if any) is prepared."""

    llm: str
    modalities: tuple[str, ...]
    train_sources: tuple[DataSource, ...]
    eval_sources: dict[str, Path]  # name -> file
    chance: dict[str, float]  # name -> chance accuracy, when known (demo)


def default_modalities(host: PluginHost) -> tuple[str, ...]:
    return tuple(name for name, spec in host.modalities().items() if spec.demo is not None)


def run_modalities(cfg: TrainConfig, host: PluginHost) -> tuple[str, ...]:
    modalities = cfg.modalities or default_modalities(host)
    for name in modalities:
        host.modality(name)  # a clear error naming the installed modalities
    return tuple(modalities)


def plan_run(cfg: TrainConfig, host: PluginHost) -> RunPlan:
    """What the run trains on; the demo's data is already in place (:func:`admit_run` put it there)."""
    modalities = run_modalities(cfg, host)
    if cfg.is_demo:
        root = Path(cfg.output_dir) / DEMO
        return RunPlan(llm=str(root / "base_llm"), modalities=tuple(modalities),
                       train_sources=(DataSource(root / "train.jsonl"),),
                       eval_sources={m: root / f"test_{m}.jsonl" for m in modalities},
                       chance={m: _demo_chance(root / f"test_{m}.jsonl") for m in modalities})
    if not cfg.data:
        raise ConfigError("--llm given without --data: name the training data (LLaVA, LAMM or generic JSON/JSONL)")
    return RunPlan(llm=cfg.llm, modalities=tuple(modalities),
                   train_sources=tuple(DataSource.parse(d) for d in cfg.data),
                   eval_sources={Path(p).stem: Path(p) for p in cfg.eval_data}, chance={})


def _demo_chance(test_file: Path) -> float:
    import json

    answers = {json.loads(line)["conversations"][-1]["value"] for line in test_file.read_text().splitlines() if line}
    return 1.0 / len(answers)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _seeded(cfg: TrainConfig, modality: str) -> dict[str, Any]:
    """The encoder options, with the run's seed for a random-init encoder whose builder takes one
    (recorded with the options, so a reload rebuilds the same weights); explicit options win."""
    options = dict(cfg.encoder_options.get(modality, {}))
    if cfg.encoder_pretrained.get(modality) is None:
        options.setdefault("seed", cfg.seed)
    return options


def model_config(cfg: TrainConfig, plan: RunPlan) -> ModelConfig:
    choices = tuple(
        ModalityChoice(name=m, encoder=cfg.encoders.get(m), encoder_pretrained=cfg.encoder_pretrained.get(m),
                       encoder_options=_seeded(cfg, m), projector=cfg.projectors.get(m),
                       projector_options=dict(cfg.projector_options.get(m, {})))
        for m in plan.modalities)
    lora = None
    if cfg.stage == "instruct":
        lora = LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets,
                            mode=cfg.lora_mode)
    return ModelConfig(llm=plan.llm, modalities=choices, lora=lora, encoder_lora=cfg.encoder_lora,
                       max_length=cfg.max_length, template=cfg.template,
                       gradient_checkpointing=cfg.gradient_checkpointing, precision=cfg.precision,
                       attn_implementation=cfg.attn_implementation, quantize=cfg.quantize,
                       encoder_gradient_checkpointing=cfg.encoder_gradient_checkpointing)


def start_from(assembled: Assembled, init_from: str, *, allow_base_mismatch: bool = False) -> list[str]:
    """Instruct stage: start from an align run's projectors, marker embeddings and encoders."""
    directory = model_dir(Path(init_from))
    meta = read_meta(directory)
    if meta["stage"] != "align":
        raise ConfigError(f"--init-from {init_from}: that run is a {meta['stage']!r} run; give an align run")
    notes = check_fingerprint(meta, assembled.model, assembled.components, llm_path=assembled.config.llm,
                              allow_base_mismatch=allow_base_mismatch)
    load_into(assembled, directory, meta, stage="align")
    return notes


def read_training_samples(cfg: TrainConfig, plan: RunPlan, host: PluginHost, assembled: Assembled
                          ) -> tuple[list[Sample], list[Skipped]]:
    """Read and check every record before training starts (schema, turn order, placeholders, paths,
    token length with modality tokens, input files present): all records are checked, then the
    first problem is raised (with the count of the others), or under ``--skip-bad-records`` every
    bad record is left out and counted."""
    problems: list[DataError] = []
    ctx = ReadContext(modalities={m: host.modality(m) for m in plan.modalities},
                      data_root=Path(cfg.data_root) if cfg.data_root else None,
                      allow_outside_root=cfg.allow_outside_root, on_bad_record=problems.append)
    try:
        samples = read_mixture(host, plan.train_sources, ctx, reader=cfg.data_format, seed=cfg.seed)
    except DataError:
        if problems and not cfg.skip_bad_records:  # e.g. "no records": every record was bad
            raise _first_of(problems) from None
        raise
    good = []
    installed = host.modalities()
    tokens = _variable_input_tokens(host, assembled, samples)
    for sample, counts in zip(samples, tokens, strict=True):
        try:
            ignored = sample.meta.get("unknown_keys", ())
            if ignored:  # an input the model would never see: refused, never dropped silently
                raise DataError(sample.source, sample.index,
                                "; ".join(ignored_key_reason(k, installed, plan.modalities) for k in ignored)
                                + " (its content would be ignored in training)", kind="ignored_input")
            assembled.prompts.encode_sample(sample, input_tokens=counts)
            missing = [p for paths in sample.inputs.values() for p in paths
                       if not (Path(p).is_file() or Path(p).is_dir())]  # a folder can be one input
            if missing:
                raise DataError(sample.source, sample.index, f"file not found: {missing[0]}", kind="missing_file")
        except DataError as exc:
            if exc.record_id is None and exc.source == sample.source and exc.record == sample.index:
                exc = DataError(exc.source, exc.record, exc.reason, record_id=sample.id, kind=exc.kind)
            problems.append(exc)
            continue
        good.append(sample)
    if problems and not cfg.skip_bad_records:
        raise _first_of(problems)
    skipped = [Skipped(exc.source if exc.record is None else f"{exc.source} record {exc.record}"
                       + (f" (id {exc.record_id})" if exc.record_id is not None else ""), exc.reason)
               for exc in problems]
    if not good:
        raise DataError(", ".join(str(s.path) for s in plan.train_sources), None, "no usable training records")
    return good, skipped


def _variable_input_tokens(host: PluginHost, assembled: Assembled, samples: Sequence[Sample]
                           ) -> list[dict[str, list[int]] | None]:
    """The slots of each input of a variable-size modality, from its preprocessed input (counted once:
    the dataset and packing reuse the counts)."""
    model = assembled.model
    counters = input_counters(model.encoders, model.projectors)
    if not counters:
        return [None] * len(samples)
    preprocess = {m: make_preprocessor(resolve(host.modality(m).load), model.encoders[m].preprocess) for m in counters}
    return count_input_tokens(samples, preprocess, counters)


def _first_of(problems: list[DataError]) -> DataError:
    first = problems[0]
    if len(problems) == 1:
        return first
    more = (f" (and {len(problems) - 1} more bad record(s): `mmkit data validate` lists them all, "
            "--skip-bad-records trains without them)")
    return DataError(first.source, first.record, first.reason + more, record_id=first.record_id, kind=first.kind)


def build_loader(cfg: TrainConfig, host: PluginHost, assembled: Assembled, samples: list[Sample],
                 modalities: tuple[str, ...], *, rank: int, world: int) -> tuple[Batches, Any, Collator]:
    """The training batches: each rank reads its part of every global batch (``sampler.py``: the
    same global batches whatever the number of processes). ``cfg.batching`` picks random padded,
    grouped or packed batches (``mmkit/data/packing.py``); ``cfg.cache_features`` fills the feature
    cache first and the batches then carry cached features (``mmkit/data/feature_cache.py``)."""
    import torch

    model = assembled.model
    preprocess = {m: make_preprocessor(resolve(host.modality(m).load), model.encoders[m].preprocess)
                  for m in modalities}
    encoders = {m: model.encoders[m] for m in modalities}
    counters = input_counters(encoders, {m: model.projectors[m] for m in modalities})
    collate = collate_fns(encoders)
    cache, in_workers = None, False
    if cfg.cache_features and not (cfg.cache_features == "auto" and cfg.encoder_lora):  # auto: frozen encoders only
        from mmkit.data.feature_cache import open_training_cache
        from mmkit.training.distributed import all_gather_objects, barrier

        where = cfg.cache_features
        if where == "auto":
            # a cache inside the run, filled by the loader workers during the first epoch (frozen
            # encoders on the CPU, off the training step); ZeRO-3 or a GPU encoder: filled before training
            where = str(Path(cfg.output_dir) / "feature_cache")
            in_workers = cfg.num_workers > 0 and cfg.zero_stage != 3 and device().type == "cpu"
        cache = open_training_cache(where, host=host, encoders={m: model.encoders[m] for m in modalities},
                                    samples=samples, preprocess=preprocess, precision=cfg.precision, device=device(),
                                    batch_size=cfg.micro_batch_size, num_workers=cfg.num_workers, rank=rank,
                                    world=world, barrier=barrier, gather=all_gather_objects,
                                    console=logs.console() if rank == 0 else None,
                                    strict=not cfg.skip_bad_records, fill=not in_workers)
    worker_encoders = encoders if in_workers else None
    dataset = SampleDataset(samples, assembled.prompts, preprocess, counters=counters,
                            skip_bad_records=cfg.skip_bad_records, cache=cache, defer_errors=True)
    grad_accum, _ = batch_geometry(micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum,
                                   global_batch_size=cfg.global_batch_size, world_size=world)
    if cfg.batching == "pad":
        sampler = GlobalBatchSampler(len(dataset), micro_batch_size=cfg.micro_batch_size, grad_accum=grad_accum,
                                     rank=rank, world_size=world, seed=cfg.seed, shuffle=cfg.shuffle)
        source, collator = dataset, Collator(pad_id=assembled.tokenizer.pad_token_id, collate=collate,
                                             record_skipped=False, encoders=worker_encoders)
    else:
        from mmkit.data.packing import make_batching, sample_lengths

        tokens = count_input_tokens(samples, preprocess, counters, cache=cache) if counters else None
        sampler, source, collator = make_batching(
            cfg.batching, samples, dataset, prompts=assembled.prompts, pad_id=assembled.tokenizer.pad_token_id,
            micro_batch_size=cfg.micro_batch_size, grad_accum=grad_accum, rank=rank, world_size=world, seed=cfg.seed,
            shuffle=cfg.shuffle, pack_max_tokens=cfg.pack_max_tokens, collate=collate,
            mix_rows=model.lora is None or len(model.lora.adapters) == 1, encoders=worker_encoders,
            lengths=sample_lengths(assembled.prompts, samples, input_tokens=tokens))
    # Its own generator: creating a loader iterator must not draw from the global RNG (exact resume).
    loader = torch.utils.data.DataLoader(source, batch_sampler=sampler, collate_fn=collator,
                                         num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
    batches = Batches(loader, collator, cache=cache, encoders=model.encoders,
                      prefetch=2 if cache is not None and cfg.num_workers == 0 else 0,
                      recompute_error=("under ZeRO-3 the encoders cannot run outside the model's forward pass; "
                                       "the next run recomputes it before training" if cfg.zero_stage == 3 else None))
    return batches, sampler, collator


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    from mmkit.modeling.loading import zero3_settings

    grad_accum, global_batch = batch_geometry(micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum,
                                              global_batch_size=cfg.global_batch_size, world_size=world_size)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": global_batch,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": cfg.zero_stage,
                              **(zero3_settings(cfg.llm, cfg.zero3_max_live_parameters) if cfg.zero_stage == 3 else {})},
        # On CPU, torch's AdamW: DeepSpeed's CPU FusedAdam keeps its bias-correction powers in the
        # C++ op (beta^t built by repeated multiplication), which a checkpoint cannot restore, so a
        # resumed run would drift from an uninterrupted one by float rounding.
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay,
                                                  "betas": [0.9, 0.999], "eps": 1e-8,
                                                  **({} if _cuda() else {"torch_adam": True})}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return config


def make_engine(cfg: TrainConfig, model: Any, param_groups: list[dict[str, Any]], *, world: int, total_steps: int
                ) -> tuple[Any, Any]:
    """The engine that runs the optimizer step, and its LR schedule: the plain torch step where DeepSpeed
    adds nothing (``optimizer_step``, :mod:`mmkit.training.optim`), DeepSpeed's engine otherwise."""
    from transformers import get_cosine_schedule_with_warmup

    warmup = int(cfg.warmup_ratio * total_steps)

    def schedule(opt: Any) -> Any:
        return get_cosine_schedule_with_warmup(opt, warmup, total_steps)

    if use_plain_step(cfg.optimizer_step, world_size=world, zero_stage=cfg.zero_stage, precision=cfg.precision):
        grad_accum, _ = batch_geometry(micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum,
                                       global_batch_size=cfg.global_batch_size, world_size=world)
        engine = PlainEngine(model, param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             max_grad_norm=cfg.max_grad_norm, grad_accum=grad_accum, device=device(),
                             lr_scheduler=schedule)
        return engine, engine.lr_scheduler
    import deepspeed

    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=param_groups,
                                                   config=deepspeed_config(cfg, world), lr_scheduler=schedule)
    if cfg.zero_stage == 0 and cfg.precision == "fp32":
        accept_plain_checkpoints(engine)  # e.g. a one-process run continued with more processes
    return engine, scheduler


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``cfg``; what the run says goes to the ``mmkit`` logger (:mod:`mmkit.training.logs`)."""
    if cfg.on_out_of_memory == "skip" and cfg.zero_stage > 0:  # a partial ZeRO 1-3 reduction cannot be dropped
        raise ConfigError(f"on_out_of_memory: skip needs ZeRO stage 0 (now {cfg.zero_stage}); use stop")
    preflight(cfg)  # every check that needs no model, before anything loads or is written
    import torch

    rank, world = init_distributed(cfg.collective_timeout_s)
    logs.setup(is_main=rank == 0)
    host = get_host()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    # The run directory is a transaction: the lock and every check that can refuse the run come
    # before anything in it changes (rundir.py); a refused run leaves it as it was.
    lock = RunLock(Path(cfg.output_dir))
    admission = admit_run(cfg, host, lock, rank=rank)
    try:
        return _train(cfg, host, admission, rank=rank, world=world)
    except BaseException:
        lock.release(refused=True)  # removes the output directory only if this run created it and it is empty
        raise
    finally:
        lock.release()


def admit_run(cfg: TrainConfig, host: PluginHost, lock: RunLock, *, rank: int) -> Admission:
    """Process 0 takes the output directory's lock, runs every check that can refuse the run and
    makes its first writes (the demo data); the others learn the outcome (every process calls this)."""
    from mmkit.training.distributed import broadcast_object

    admission = Admission(Path(cfg.output_dir))
    problem: BaseException | None = None
    if rank == 0:
        try:
            lock.acquire()
            from mmkit.demo.task import prepare_demo

            admission = admit(cfg, host, run_modalities(cfg, host), prepare_demo=prepare_demo)
            admission.commit()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every process
            admission.abandon()
            lock.release(refused=True)
            problem = exc
    shared = broadcast_object(problem if isinstance(problem, MmkitError) or problem is None
                              else TrainingError(f"process 0 could not start the run: {problem}"))
    if problem is not None:
        raise problem
    if shared is not None:
        raise shared
    return admission


def _train(cfg: TrainConfig, host: PluginHost, admission: Admission, *, rank: int, world: int) -> dict[str, Any]:
    """The admitted run, one stage per call: model, data, resume point, engine, training, outputs."""
    is_main = rank == 0
    if is_main:
        for note in admission.notes:
            log.info("note: %s", note)
    plan, assembled = build_model(cfg, host, world=world, is_main=is_main)
    groups = trainable_parameters(assembled.model, cfg.stage)
    data = build_data(cfg, host, plan, assembled, rank=rank, world=world)
    record = RunRecord.of(cfg, plan, assembled, data)  # before DeepSpeed wraps the model
    resume = choose_resume(cfg, assembled, record, rank=rank, world=world)
    if is_main:
        accept_run(cfg, plan, resume)
    n_trainable = sum(p.numel() for group in groups.values() for p in group)  # before ZeRO-3 partitions them
    engine, scheduler = make_engine(cfg, assembled.model, param_groups(cfg, groups), world=world,
                                    total_steps=data.total_steps)
    state = resume.after_engine(engine, scheduler, rank=rank, seed=cfg.seed) if resume is not None else TrainState()
    metrics = open_metrics(cfg, state, resume, is_main=is_main)
    if is_main:
        announce(cfg, plan, data, engine, state, resume, world=world, n_trainable=n_trainable)
    checkpoints = Checkpoints.start(cfg, engine, scheduler, assembled, record.run_info(cfg, data, world=world),
                                    state, resume, rank=rank)
    trainer = Trainer(cfg, engine, data.loader, data.sampler, scheduler, metrics,
                      process=Process(rank, world, device()), save=checkpoints.save)
    summary = trainer.run(state, data.total_steps, last_checkpoint=checkpoints.last)
    checkpoints.final(state)
    finish_run(cfg, summary, data, metrics, assembled, checkpoints.last, resume, rank=rank, world=world)
    if is_main and plan.eval_sources:
        summary["eval"] = evaluate_outputs(cfg, plan, host)
    return summary


def build_model(cfg: TrainConfig, host: PluginHost, *, world: int, is_main: bool) -> tuple[RunPlan, Assembled]:
    """What the run trains on, and the assembled model (seeded), started from an align run under
    ``--init-from``."""
    import torch

    torch.manual_seed(cfg.seed)
    plan = plan_run(cfg, host)
    torch.manual_seed(cfg.seed)
    # under ZeRO-3 the LLM loads straight into its partitions (zero.Init): no process holds it whole
    assembled = assemble(model_config(cfg, plan), host, deepspeed_config=deepspeed_config(cfg, world))
    if cfg.init_from:
        for note in start_from(assembled, cfg.init_from, allow_base_mismatch=cfg.allow_base_mismatch):
            if is_main:
                log.info("note: %s", note)
    return plan, assembled


@attrs.frozen
class TrainingData:
    """The checked records, the batches made of them, and the run's length in optimizer steps."""

    samples: list[Sample]
    skipped: list[Skipped]  # records left out before training (--skip-bad-records)
    loader: Batches
    sampler: Any
    collator: Collator  # also counts the records skipped while training
    total_steps: int


def build_data(cfg: TrainConfig, host: PluginHost, plan: RunPlan, assembled: Assembled, *, rank: int, world: int
               ) -> TrainingData:
    """Read and check every record, then make the loader (:func:`build_loader`)."""
    samples, skipped = read_training_samples(cfg, plan, host, assembled)
    if rank == 0:
        from mmkit.data.vocab import unknown_words_warning

        warning = unknown_words_warning(assembled.tokenizer, samples)
        if warning:
            log.warning("warning: %s", warning)
    loader, sampler, collator = build_loader(cfg, host, assembled, samples, plan.modalities, rank=rank, world=world)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * sampler.steps_per_epoch))
    return TrainingData(samples, skipped, loader, sampler, collator, total_steps)


@attrs.frozen
class RunRecord:
    """What a resume checks against and each checkpoint records: the resolved configuration, the
    batch geometry and the trainable shapes (taken before DeepSpeed wraps, and ZeRO-3 partitions, the model)."""

    config: dict[str, Any]
    geometry: dict[str, int]
    trainable: dict[str, list[int]]

    @classmethod
    def of(cls, cfg: TrainConfig, plan: RunPlan, assembled: Assembled, data: TrainingData) -> RunRecord:
        sampler = data.sampler
        return cls(config=attrs.evolve(cfg, modalities=plan.modalities).to_dict(),
                   geometry={"micro_batch_size": cfg.micro_batch_size, "grad_accum": sampler.grad_accum,
                             "global_batch_size": sampler.global_batch_size, "num_samples": sampler.num_samples},
                   trainable={n: list(p.shape) for n, p in assembled.model.named_parameters() if p.requires_grad})

    def run_info(self, cfg: TrainConfig, data: TrainingData, *, world: int) -> dict[str, Any]:
        """The run's description saved in each checkpoint (its ``state.json``)."""
        return {"world_size": world, **self.geometry, "zero_stage": cfg.zero_stage, "precision": cfg.precision,
                "steps_per_epoch": data.sampler.steps_per_epoch, "total_steps": data.total_steps,
                "config": self.config, "trainable": self.trainable, "versions": _versions()}


def choose_resume(cfg: TrainConfig, assembled: Assembled, record: RunRecord, *, rank: int, world: int
                  ) -> Resume | None:
    """The checkpoint to resume from (``cfg.resume``), checked against this run, with the weights that
    must load before the engine exists; ``None`` starts over."""
    resume = plan_resume(resume=cfg.resume, output_dir=Path(cfg.output_dir), config=record.config, world_size=world,
                         geometry=record.geometry, trainable=record.trainable,
                         on_world_size_change=cfg.on_world_size_change, rank=rank, trust=cfg.trust_checkpoint)
    if resume is not None:
        resume.before_engine(assembled)
    return resume


def accept_run(cfg: TrainConfig, plan: RunPlan, resume: Resume | None) -> None:
    """The run is accepted: its configuration (``config.yaml``) replaces an earlier one."""
    out = Path(cfg.output_dir)
    _storage_guard(lambda: save_config(attrs.evolve(cfg, modalities=plan.modalities), out / "config.yaml"),
                   f"{out / 'config.yaml'}", resume)


def param_groups(cfg: TrainConfig, groups: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The optimizer's groups: projectors and marker embeddings at ``projector_lr``, LoRA at ``lr``."""
    projector_lr = cfg.projector_lr or cfg.lr
    optimizer_groups = [{"params": groups.get("projectors", []) + groups.get("embeddings", []), "lr": projector_lr}]
    if "lora" in groups:
        optimizer_groups.append({"params": groups["lora"], "lr": cfg.lr})
    return optimizer_groups


def open_metrics(cfg: TrainConfig, state: TrainState, resume: Resume | None, *, is_main: bool) -> MetricsLog:
    """The metrics log, continuing at ``state``'s step."""
    out = Path(cfg.output_dir)
    if is_main:  # a resumed run logs the steps after its checkpoint again
        _storage_guard(lambda: trim_metrics(out, state.step), f"{out / 'metrics.jsonl'}", resume)
    _barrier()
    return _storage_guard(lambda: MetricsLog(out, tensorboard=cfg.tensorboard, enabled=is_main),
                          f"the metrics log in {out}", resume)


def announce(cfg: TrainConfig, plan: RunPlan, data: TrainingData, engine: Any, state: TrainState,
             resume: Resume | None, *, world: int, n_trainable: int) -> None:
    """Process 0's opening lines: what runs, and where a resumed run picks up."""
    log.info("mmkit train stage=%s modalities=%s llm=%s samples=%d steps=%d processes=%d global_batch=%d zero=%d "
             "precision=%s trainable=%s params optimizer=%s", cfg.stage, ",".join(plan.modalities),
             cfg.llm or "embedded demo (tiny LLaMA)", len(data.samples), data.total_steps, world,
             data.sampler.global_batch_size, cfg.zero_stage, cfg.precision, f"{n_trainable:,}",
             "torch" if isinstance(engine, PlainEngine) else "deepspeed")
    if resume is not None:
        log.info("resuming from %s (step %d, epoch %d)", resume.checkpoint, state.step, state.epoch)
        for note in resume.notes:
            log.info("  note: %s", note)
        if state.step >= data.total_steps:
            log.info("  the run had already reached step %d: nothing left to train (raise max_steps/epochs to "
                     "continue, or --resume never to start over)", data.total_steps)


@attrs.define
class Checkpoints:
    """The run's checkpoint saves (the Trainer's and the final one) and the newest checkpoint kept,
    which a later failed write names."""

    cfg: TrainConfig
    engine: Any
    scheduler: Any
    assembled: Assembled
    run_info: dict[str, Any]
    rank: int
    saved_at: list[int]
    last: str | None

    @classmethod
    def start(cls, cfg: TrainConfig, engine: Any, scheduler: Any, assembled: Assembled, run_info: dict[str, Any],
              state: TrainState, resume: Resume | None, *, rank: int) -> Checkpoints:
        """A resumed run starts with its checkpoint as the newest, saved at the restored step."""
        return cls(cfg, engine, scheduler, assembled, run_info, rank,
                   saved_at=[state.step] if resume is not None else [],
                   last=str(resume.checkpoint) if resume is not None else None)

    def save(self, at: TrainState) -> str:
        path = save_checkpoint(Path(self.cfg.output_dir), engine=self.engine, assembled=self.assembled,
                               stage=self.cfg.stage, state=at,
                               run_info={**self.run_info, "scheduler": self.scheduler.state_dict()},
                               keep_last=self.cfg.keep_last, rank=self.rank)
        self.saved_at.append(at.step)
        self.last = str(path)
        return self.last

    def final(self, state: TrainState) -> None:
        """The final checkpoint, unless the last save was at this very step."""
        if not self.saved_at or self.saved_at[-1] != state.step:
            self.save(state)


def finish_run(cfg: TrainConfig, summary: dict[str, Any], data: TrainingData, metrics: MetricsLog,
               assembled: Assembled, last_checkpoint: str | None, resume: Resume | None, *, rank: int, world: int
               ) -> None:
    """The run's outputs after training: the skipped records, the metrics log's closing line and the
    model; ``summary`` gains the skipped count and the step resumed from."""
    is_main, out = rank == 0, Path(cfg.output_dir)
    summary["skipped_records"] = len(data.skipped) + _skipped_in_training(data.collator, world)
    left_out = skipped_records(data.skipped, data.collator.skipped, world=world)  # each named in RUN/skipped.jsonl
    if is_main and left_out:
        _storage_guard(lambda: write_skipped(out / "skipped.jsonl", left_out), f"{out / 'skipped.jsonl'}",
                       last_checkpoint)
    summary["resumed_from_step"] = resume.step if resume is not None else None

    def finish_log() -> None:
        metrics.log(summary["steps"], {"skipped_records": summary["skipped_records"],
                                       "nonfinite_steps": summary["nonfinite_steps"]})
        metrics.close()

    _storage_guard(finish_log, f"the metrics log in {out}", last_checkpoint)
    _storage_guard(lambda: save_model(out, assembled, stage=cfg.stage, write=is_main), f"{out / 'model'}",
                   last_checkpoint)
    _barrier()
    if is_main:
        if summary["steps_this_run"]:
            log.info("saved %s (%d steps, final loss %.4f, %.0f tokens/s, %d skipped records)", out / "model",
                     summary["steps"], summary["final_loss"], summary["tokens_per_s"], summary["skipped_records"])
        else:  # resumed at its end: no loss or rate was measured in this run
            log.info("saved %s (%d steps, none trained in this run)", out / "model", summary["steps"])


def evaluate_outputs(cfg: TrainConfig, plan: RunPlan, host: PluginHost) -> dict[str, Any]:
    """Process 0 evaluates the saved model on the run's evaluation sets (printed, and returned)."""
    from mmkit.evaluation.evaluate import evaluate_run, print_eval

    results = evaluate_run(Path(cfg.output_dir), plan.eval_sources, chance=plan.chance,
                           batch_size=cfg.eval_batch_size, max_new_tokens=cfg.eval_max_new_tokens, host=host)
    print_eval(results, logs.console())
    return results


def _storage_guard(write: Any, what: str, last_checkpoint: Any) -> Any:
    """Run a write outside the checkpoint saver; a full disk or any other storage error, whichever
    library raised it, becomes a clear :class:`TrainingError` naming what and the checkpoint kept."""
    try:
        return write()
    except MmkitError:
        raise
    except Exception as exc:
        if not is_storage_error(exc):
            raise
        last = getattr(last_checkpoint, "checkpoint", last_checkpoint)
        raise storage_error(exc, what=what, last_checkpoint=str(last) if last is not None else None) from None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _skipped_in_training(collator: Collator, world: int) -> int:
    """Distinct records skipped while training, over all processes and epochs."""
    where = {s.where for s in collator.skipped}
    if world > 1:
        from mmkit.training.distributed import all_gather_objects

        where = set().union(*all_gather_objects(sorted(where)))
    return len(where)


def _versions() -> dict[str, str]:
    import deepspeed
    import torch

    from mmkit import __version__

    return {"mmkit": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__}

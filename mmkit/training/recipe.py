"""The training recipe: data -> assembled model -> DeepSpeed loop -> saved model -> evaluation.

Read top to bottom; each step is one function call.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import attrs

from mmkit.data.batching import Collator, SampleDataset, Skipped, make_preprocessor
from mmkit.data.records import ReadContext, Sample
from mmkit.data.sources import DataSource, read_mixture
from mmkit.errors import ConfigError, DataError, InputError
from mmkit.modeling.builder import Assembled, ModalityChoice, ModelConfig, assemble, trainable_parameters
from mmkit.modeling.lora import LoraSettings
from mmkit.modeling.persistence import check_fingerprint, load_into, model_dir, read_meta, save_model
from mmkit.plugins import PluginHost, get_host
from mmkit.specs import resolve
from mmkit.training.config import TrainConfig, save_config
from mmkit.training.distributed import device, init_distributed
from mmkit.training.metrics_log import MetricsLog


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


def plan_run(cfg: TrainConfig, host: PluginHost, *, is_main: bool) -> RunPlan:
    modalities = cfg.modalities or default_modalities(host)
    for name in modalities:
        host.modality(name)  # a clear error naming the installed modalities
    if cfg.is_demo:
        from mmkit.demo.task import prepare_demo

        root = Path(cfg.output_dir) / "demo_data"
        if is_main:
            prepare_demo(host, modalities, root, seed=cfg.seed)
        _barrier()
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


def model_config(cfg: TrainConfig, plan: RunPlan) -> ModelConfig:
    choices = tuple(
        ModalityChoice(name=m, encoder=cfg.encoders.get(m), encoder_pretrained=cfg.encoder_pretrained.get(m),
                       encoder_options=dict(cfg.encoder_options.get(m, {})), projector=cfg.projectors.get(m),
                       projector_options=dict(cfg.projector_options.get(m, {})))
        for m in plan.modalities)
    lora = None
    if cfg.stage == "instruct":
        lora = LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets,
                            mode=cfg.lora_mode)
    return ModelConfig(llm=plan.llm, modalities=choices, lora=lora, encoder_lora=cfg.encoder_lora,
                       max_length=cfg.max_length, template=cfg.template,
                       gradient_checkpointing=cfg.gradient_checkpointing)


def start_from(assembled: Assembled, init_from: str) -> None:
    """Instruct stage: start from an align run's projectors, marker embeddings and encoders."""
    directory = model_dir(Path(init_from))
    meta = read_meta(directory)
    if meta["stage"] != "align":
        raise ConfigError(f"--init-from {init_from}: that run is a {meta['stage']!r} run; give an align run")
    check_fingerprint(meta, assembled.model, assembled.components)
    load_into(assembled, directory, meta, stage="align")


def read_training_samples(cfg: TrainConfig, plan: RunPlan, host: PluginHost, assembled: Assembled
                          ) -> tuple[list[Sample], list[Skipped]]:
    """Read and check every record before training starts (schema, placeholders, token length)."""
    skipped: list[Skipped] = []

    def skip(exc: DataError) -> None:  # a malformed record, under --skip-bad-records
        where = exc.source if exc.record is None else f"{exc.source} record {exc.record}"
        skipped.append(Skipped(where, exc.reason))

    ctx = ReadContext(modalities={m: host.modality(m) for m in plan.modalities},
                      data_root=Path(cfg.data_root) if cfg.data_root else None,
                      allow_outside_root=cfg.allow_outside_root,
                      on_bad_record=skip if cfg.skip_bad_records else None)
    samples = read_mixture(host, plan.train_sources, ctx, reader=cfg.data_format, seed=cfg.seed)
    good = []
    for sample in samples:
        try:
            assembled.prompts.encode_sample(sample)
            missing = [p for paths in sample.inputs.values() for p in paths if not Path(p).is_file()]
            if missing:
                raise DataError(sample.source, sample.index, f"id {sample.id}: file not found: {missing[0]}")
        except DataError as exc:
            if not cfg.skip_bad_records:
                raise
            skipped.append(Skipped(sample.where, str(exc)))
            continue
        good.append(sample)
    if not good:
        raise DataError(", ".join(str(s.path) for s in plan.train_sources), None, "no usable training records")
    return good, skipped


def build_loader(cfg: TrainConfig, host: PluginHost, assembled: Assembled, samples: list[Sample],
                 modalities: tuple[str, ...], *, rank: int, world: int) -> tuple[Any, Any, Collator]:
    """The training batches: each rank reads its shard of the samples, shuffled per epoch."""
    import torch

    model = assembled.model
    preprocess = {m: make_preprocessor(resolve(host.modality(m).load), model.encoders[m].preprocess)
                  for m in modalities}
    adapters = model.lora.adapters if model.lora is not None else ["-"]
    dataset = SampleDataset(samples, assembled.prompts, preprocess, adapters, skip_bad_records=cfg.skip_bad_records)
    collator = Collator(pad_id=assembled.tokenizer.pad_token_id)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                                  drop_last=world > 1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.micro_batch_size, sampler=sampler,
                                         collate_fn=collator, num_workers=cfg.num_workers)
    return loader, sampler, collator


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": cfg.zero_stage},
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay,
                                                  "betas": [0.9, 0.999], "eps": 1e-8}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return config


def train(cfg: TrainConfig, *, console: Any = None) -> dict[str, Any]:
    import deepspeed
    import torch
    from rich.console import Console
    from transformers import get_cosine_schedule_with_warmup

    console = console or Console()
    rank, world = init_distributed()
    is_main = rank == 0
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    host = get_host()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)

    plan = plan_run(cfg, host, is_main=is_main)
    if is_main:
        save_config(attrs.evolve(cfg, modalities=plan.modalities), out / "config.yaml")
    torch.manual_seed(cfg.seed)
    assembled = assemble(model_config(cfg, plan), host)
    if cfg.init_from:
        start_from(assembled, cfg.init_from)
    model = assembled.model
    groups = trainable_parameters(model, cfg.stage)
    samples, skipped = read_training_samples(cfg, plan, host, assembled)

    loader, sampler, collator = build_loader(cfg, host, assembled, samples, plan.modalities, rank=rank, world=world)
    steps_per_epoch = max(1, len(loader) // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    projector_lr = cfg.projector_lr or cfg.lr
    param_groups = [{"params": groups.get("projectors", []) + groups.get("embeddings", []), "lr": projector_lr}]
    if "lora" in groups:
        param_groups.append({"params": groups["lora"], "lr": cfg.lr})
    n_trainable = sum(p.numel() for group in groups.values() for p in group)  # before ZeRO-3 partitions them
    warmup = int(cfg.warmup_ratio * total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups, config=deepspeed_config(cfg, world),
        lr_scheduler=lambda opt: get_cosine_schedule_with_warmup(opt, warmup, total_steps))

    log = MetricsLog(out, tensorboard=cfg.tensorboard, enabled=is_main)
    if is_main:
        console.print(f"[bold]mmkit train[/] stage={cfg.stage} modalities={','.join(plan.modalities)} "
                      f"llm={cfg.llm or 'embedded demo (tiny LLaMA)'} samples={len(samples)} steps={total_steps} "
                      f"processes={world} zero={cfg.zero_stage} precision={cfg.precision} "
                      f"trainable={n_trainable:,} params")
    summary = _loop(cfg, engine, loader, sampler, scheduler, log, total_steps, console, is_main, device())
    summary["skipped_records"] = len(skipped) + len(collator.skipped)
    log.log(summary["steps"], {"skipped_records": summary["skipped_records"]})
    log.close()

    save_model(out, assembled, stage=cfg.stage, write=is_main)
    _barrier()
    if is_main:
        console.print(f"saved {out / 'model'} ({summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
                      f"{summary['tokens_per_s']:.0f} tokens/s, {summary['skipped_records']} skipped records)")
    if is_main and plan.eval_sources:
        from mmkit.evaluation.evaluate import evaluate_run, print_eval

        results = evaluate_run(out, plan.eval_sources, chance=plan.chance, batch_size=cfg.eval_batch_size,
                               max_new_tokens=cfg.eval_max_new_tokens, host=host)
        print_eval(results, console)
        summary["eval"] = results
    return summary


def _loop(cfg, engine, loader, sampler, scheduler, log, total_steps, console, is_main, dev) -> dict[str, Any]:
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                        console=console, disable=not is_main, transient=False)
    step, epoch = 0, 0
    tokens_window, loss_window, loss_count = 0, 0.0, 0
    total_tokens, last_loss = 0, float("nan")
    start = window_start = time.perf_counter()
    engine.train()
    with progress:
        task = progress.add_task("train", total=total_steps, loss=float("nan"), tps=0.0)
        while step < total_steps:
            sampler.set_epoch(epoch)
            for batch in loader:
                if batch.get("empty"):
                    continue
                out = engine(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                             labels=batch["labels"].to(dev), inputs={m: t.to(dev) for m, t in batch["inputs"].items()},
                             adapters=batch["adapters"])
                loss = out.loss
                if not torch.isfinite(loss):
                    raise DataError("batch", None, f"non-finite loss {loss.item()} at step {step} "
                                                   f"(records {', '.join(batch['ids'][:8])})")
                engine.backward(loss)
                boundary = engine.is_gradient_accumulation_boundary()
                engine.step()
                tokens_window += batch["num_tokens"]
                total_tokens += batch["num_tokens"]
                loss_window += float(loss.detach())
                loss_count += 1
                if not boundary:
                    continue
                step += 1
                if step % cfg.log_every == 0 or step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    last_loss = loss_window / loss_count
                    tps = tokens_window / max(elapsed, 1e-9)
                    log.log(step, {"loss": last_loss, "lr": scheduler.get_last_lr()[-1], "tokens_per_s": tps,
                                   "padding_fraction": batch["padding_fraction"], "epoch": epoch,
                                   "elapsed_s": time.perf_counter() - start})
                    progress.update(task, loss=last_loss, tps=tps)
                    tokens_window, loss_window, loss_count = 0, 0.0, 0
                    window_start = time.perf_counter()
                progress.update(task, completed=step)
                if step >= total_steps:
                    break
            epoch += 1
    elapsed = time.perf_counter() - start
    return {"steps": step, "final_loss": last_loss, "tokens_per_s": total_tokens / max(elapsed, 1e-9),
            "train_seconds": elapsed}

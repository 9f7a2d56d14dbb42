"""``mmkit train``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command(context_settings={"help_option_names": ["-h", "--help"]})(train)


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _keyed(items: list[str] | None, what: str) -> dict[str, str] | None:
    """``modality=value`` pairs."""
    if not items:
        return None
    from mmkit.errors import ConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{what} {item!r}: expected MODALITY=VALUE")
        out[key.strip()] = value.strip()
    return out


def train(
    modalities: Annotated[Optional[str], typer.Option(help="Comma-separated modalities, e.g. image,pointcloud. "
                                                       "Default: every installed modality with a demo.")] = None,
    llm: Annotated[Optional[str], typer.Option(help="Hugging Face causal LM (hub id or local path). "
                                                "Omit to train the embedded demo.")] = None,
    data: Annotated[Optional[list[str]], typer.Option(help="Training file (LLaVA/LAMM/generic JSON or JSONL); "
                                                       "repeat to mix, FILE:WEIGHT to weight.")] = None,
    eval_data: Annotated[Optional[list[str]], typer.Option(help="Held-out file(s) scored after training.")] = None,
    data_root: Annotated[Optional[str], typer.Option(help="Root for relative input paths.")] = None,
    data_format: Annotated[Optional[str], typer.Option(help="Reader name (default: detect).")] = None,
    output_dir: Annotated[Optional[str], typer.Option(help="Run directory (default runs/demo or runs/mmkit).")] = None,
    stage: Annotated[Optional[str], typer.Option(help="align (projectors only) or instruct (+ LoRA).")] = None,
    init_from: Annotated[Optional[str], typer.Option(help="Align run to start the instruct stage from.")] = None,
    encoder: Annotated[Optional[list[str]], typer.Option(help="MODALITY=ENCODER_NAME")] = None,
    encoder_pretrained: Annotated[Optional[list[str]], typer.Option(help="MODALITY=HUB_ID_OR_PATH")] = None,
    projector: Annotated[Optional[list[str]], typer.Option(help="MODALITY=PROJECTOR_NAME")] = None,
    epochs: Annotated[Optional[float], typer.Option()] = None,
    max_steps: Annotated[Optional[int], typer.Option()] = None,
    micro_batch_size: Annotated[Optional[int], typer.Option()] = None,
    grad_accum: Annotated[Optional[int], typer.Option()] = None,
    global_batch_size: Annotated[Optional[int], typer.Option(
        help="Samples per optimizer step over all processes (grad_accum is then derived).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (LoRA).")] = None,
    projector_lr: Annotated[Optional[float], typer.Option(help="Learning rate of projectors and markers.")] = None,
    zero_stage: Annotated[Optional[int], typer.Option(help="DeepSpeed ZeRO stage 0-3.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp32, bf16 or fp16.")] = None,
    lora_mode: Annotated[Optional[str], typer.Option(help="per_modality or shared.")] = None,
    lora_r: Annotated[Optional[int], typer.Option()] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option()] = None,
    skip_bad_records: Annotated[Optional[bool], typer.Option(help="Skip and count records that fail to load.")] = None,
    batching: Annotated[Optional[str], typer.Option(
        help="pad (random batches, padded), grouped (by modality and length) or packed (several samples per "
             "sequence, attention kept inside each).")] = None,
    pack_max_tokens: Annotated[Optional[int], typer.Option(
        help="Tokens per packed sequence with --batching packed (default: max_length).")] = None,
    cache_features: Annotated[Optional[str], typer.Option(
        help="Directory caching frozen-encoder features: each input is encoded once, later epochs and runs "
             "read them.")] = None,
    template: Annotated[Optional[str], typer.Option(
        help="Prompt template: a name from mmkit's template library or a path to a Jinja chat template file; "
             "default: the tokenizer's own.")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    num_procs: Annotated[Optional[int], typer.Option(help="Data-parallel processes on this machine (gloo on CPU, "
                                                      "NCCL on GPUs). Several machines: see README.")] = None,
    save_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps (and always at the end).")] = None,
    resume: Annotated[Optional[str], typer.Option(help="auto (default: continue from the newest checkpoint in the "
                                                   "output dir), never (start over), or a checkpoint/run directory."
                                                   )] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML file of options; flags override it.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any option as KEY=VALUE.")] = None,
) -> None:
    """Assemble an LLM with the chosen modalities and train it with DeepSpeed.

    With no --llm/--data it trains the embedded demo on this machine and evaluates it.
    """
    from mmkit.training.config import parse_assignments, resolve_config
    from mmkit.training.recipe import train as run

    overrides = {
        "modalities": _split(modalities), "llm": llm, "data": data, "eval_data": eval_data, "data_root": data_root,
        "data_format": data_format, "output_dir": output_dir, "stage": stage, "init_from": init_from,
        "encoders": _keyed(encoder, "--encoder"), "encoder_pretrained": _keyed(encoder_pretrained, "--encoder-pretrained"),
        "projectors": _keyed(projector, "--projector"), "epochs": epochs, "max_steps": max_steps,
        "micro_batch_size": micro_batch_size, "grad_accum": grad_accum, "lr": lr, "projector_lr": projector_lr,
        "zero_stage": zero_stage, "precision": precision, "lora_mode": lora_mode, "lora_r": lora_r,
        "gradient_checkpointing": gradient_checkpointing, "skip_bad_records": skip_bad_records, "seed": seed,
        "batching": batching, "pack_max_tokens": pack_max_tokens, "cache_features": cache_features,
        "template": template,
        "global_batch_size": global_batch_size, "num_procs": num_procs, "save_every": save_every, "resume": resume,
        **parse_assignments(set_),
    }
    cfg = resolve_config(config, overrides)
    if cfg.num_procs > 1:
        from mmkit.training.launch import launch, launched_externally

        if not launched_externally():  # else: deepspeed / torchrun / our launcher already started the group
            code = launch(cfg)
            if code:
                raise typer.Exit(code)
            return
    run(cfg)

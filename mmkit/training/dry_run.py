"""``mmkit train --dry-run``: size a run before renting the machines for it.

The model is built on the meta device from the configurations alone (no weights are read or
allocated): the LLM from its ``config.json`` (a local directory, or a hub id whose config is
fetched), each encoder by its plugin's own builder with ``from_pretrained`` answered from the
checkpoint's config (:func:`weightless`), the projectors and LoRA adapters as training builds them.
It reports parameters per component (``llm``, ``encoder.<modality>``, ``projector.<modality>``,
each ``total`` and ``trainable``; the marker-token embeddings count as the LLM's), the LLM tokens
each input becomes, and the model-state memory per GPU for each ZeRO stage on ``num_procs`` GPUs.

Memory per GPU counts weights, gradients and optimizer states, not activations. Frozen weights
take their dtype's size (``precision``; 1 or 0.5 byte with ``quantize``), divided among the GPUs
under ZeRO-3. Trainable weights in bf16/fp16 follow DeepSpeed's estimators
(``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``: 2 bytes of
16-bit weights + 18 bytes of gradients, fp32 master weights and Adam moments, the 18 partitioned
from stage 2, everything from stage 3, plus the largest layer gathered whole); stage 0 keeps all
20 bytes on every GPU and stage 1 partitions the 16 bytes of fp32 master weights and moments. In
fp32, 16 bytes per trainable weight (weights, gradients, two moments), partitioned alike.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from mmkit.errors import ConfigError

GIB = 2**30
_FROZEN_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0}
_QUANT_BYTES = {"4bit": 0.5, "8bit": 1.0}


@contextlib.contextmanager
def weightless() -> Iterator[None]:
    """While open, ``from_pretrained`` of any transformers model builds it from the checkpoint's
    configuration on the meta device instead of loading weights, and modules are created on the
    meta device: a plugin's own encoder builder then runs unchanged and allocates nothing."""
    import torch
    from transformers import PreTrainedModel

    original = PreTrainedModel.__dict__["from_pretrained"]

    def from_config_only(cls, pretrained_model_name_or_path, *args, **kwargs):
        config = kwargs.pop("config", None)
        if config is None:
            config = cls.config_class.from_pretrained(pretrained_model_name_or_path)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        return cls._from_config(config, **({"dtype": dtype} if dtype is not None else {}))

    PreTrainedModel.from_pretrained = classmethod(from_config_only)
    try:
        with torch.device("meta"):
            yield
    finally:
        PreTrainedModel.from_pretrained = original


def _count(module: Any) -> tuple[int, int]:
    params = {id(p): p for p in module.parameters()}.values()  # tied weights once
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _largest_layer(modules: list[Any]) -> int:
    """The most parameters any single module holds directly (what ZeRO-3 gathers at once)."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for root in modules for m in root.modules()),
               default=0)


def build_meta_model(cfg: Any, host: Any) -> dict[str, Any]:
    """The run's components on the meta device, with the trainable flags training would set."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mmkit.modeling.assemble import _add_encoder_lora, linear_module_names
    from mmkit.modeling.components import build_encoder, build_projector
    from mmkit.modeling.loading import torch_dtype
    from mmkit.modeling.lora import LoraSettings, RoutedLora, adapter_names_for
    from mmkit.training.recipe import default_modalities

    if cfg.llm is None:
        raise ConfigError("--dry-run sizes a run of a real LLM: give --llm (a local model directory with "
                          "config.json, or a hub id)")
    try:
        from mmkit.demo.llm import resolve_llm

        llm_config = AutoConfig.from_pretrained(resolve_llm(cfg.llm))  # "tiny": --llm tiny
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--dry-run: cannot read the LLM configuration {cfg.llm!r}: {exc}") from None
    modalities = tuple(cfg.modalities or default_modalities(host))
    specs = {m: host.modality(m) for m in modalities}
    dtype = torch_dtype(cfg.precision)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(llm_config, dtype=dtype)
    llm.requires_grad_(False)
    hidden = llm.get_input_embeddings().weight.shape[1]
    markers = {t for spec in specs.values() for t in spec.markers.special_tokens()}

    encoders, projectors, tokens = {}, {}, {}
    with weightless():
        for m in modalities:
            spec = specs[m]
            encoder = build_encoder(host, spec, encoder_name=cfg.encoders.get(m), pretrained=cfg.encoder_pretrained.get(m),
                                    options=dict(cfg.encoder_options.get(m, {})))
            encoder.requires_grad_(False)
            projector = build_projector(host, cfg.projectors.get(m) or spec.projector, in_dim=encoder.output_dim,
                                        out_dim=hidden, num_tokens=encoder.num_tokens,
                                        options=dict(cfg.projector_options.get(m, {})),
                                        separator=bool(getattr(encoder, "uses_separators", False)))
            fixed = projector.num_output_tokens  # None: a variable-size encoder's count follows each input
            encoders[m], projectors[m], tokens[m] = encoder, projector, None if fixed is None else int(fixed)
        if cfg.stage == "instruct":
            settings = LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                    targets=cfg.lora_targets, mode=cfg.lora_mode)
            if not settings.targets:
                settings = LoraSettings(r=settings.r, alpha=settings.alpha, dropout=settings.dropout, mode=settings.mode,
                                        targets=tuple(host.lora_targets(llm.config.model_type, linear_module_names(llm))))
            llm = RoutedLora(llm, adapter_names_for(list(modalities), settings.mode), settings).model
            if cfg.encoder_lora:
                _add_encoder_lora(encoders, specs, settings)
                for encoder in encoders.values():
                    for name, p in encoder.named_parameters():
                        p.requires_grad_("lora_" in name)
    return {"llm": llm, "hidden": hidden, "markers": len(markers), "encoders": encoders, "projectors": projectors,
            "tokens": tokens, "modalities": modalities}


def memory_per_gpu(*, frozen_llm: int, frozen_other: int, trainable: int, largest_layer: int, num_gpus: int,
                   precision: str, quantize: str | None = None) -> dict[str, float]:
    """Model-state bytes per GPU for ZeRO stages 0-3 (see the module docstring), in GiB. Only the
    LLM's frozen weights are quantized by ``quantize``."""
    n = max(1, num_gpus)
    frozen_bytes = (frozen_llm * (_QUANT_BYTES[quantize] if quantize else _FROZEN_BYTES[precision])
                    + frozen_other * _FROZEN_BYTES[precision])
    t = trainable
    if precision == "fp32":
        stages = {0: 16 * t, 1: 8 * t + 8 * t / n, 2: 4 * t + 12 * t / n, 3: 16 * t / n + 4 * largest_layer}
    else:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, zero2 = estimate_zero2_model_states_mem_needs(total_params=t, num_gpus_per_node=n, cpu_offload=False)
        _, zero3, _ = estimate_zero3_model_states_mem_needs(total_params=t, largest_layer_params=largest_layer,
                                                            num_gpus_per_node=n, cpu_offload=False,
                                                            cpu_offload_params=False, zero_init=True)
        stages = {0: 20 * t, 1: 4 * t + 16 * t / n, 2: zero2, 3: zero3}
    return {str(s): round((v + (frozen_bytes / n if s == 3 else frozen_bytes)) / GIB, 3) for s, v in stages.items()}


def dry_run(cfg: Any, host: Any = None) -> dict[str, Any]:
    """The figures ``mmkit train --dry-run`` prints, as one JSON-serialisable object."""
    if host is None:
        from mmkit.plugins import get_host

        host = get_host()
    built = build_meta_model(cfg, host)
    llm_total, llm_trainable = _count(built["llm"])
    markers = built["markers"] * built["hidden"]  # the trainable table of added marker tokens
    parameters: dict[str, dict[str, int]] = {"llm": {"total": llm_total + markers, "trainable": llm_trainable + markers}}
    for m in built["modalities"]:
        total, trainable = _count(built["encoders"][m])
        parameters[f"encoder.{m}"] = {"total": total, "trainable": trainable}
        total, trainable = _count(built["projectors"][m])
        parameters[f"projector.{m}"] = {"total": total, "trainable": trainable}
    total = sum(c["total"] for c in parameters.values())
    trainable = sum(c["trainable"] for c in parameters.values())
    largest = _largest_layer([built["llm"], *built["encoders"].values(), *built["projectors"].values()])
    tokens = {m: built["tokens"][m] for m in built["modalities"]}
    return {
        "llm": cfg.llm,
        "stage": cfg.stage,
        "precision": cfg.precision,
        "quantize": cfg.quantize,
        "parameters": parameters,
        "parameters_all": {"total": total, "trainable": trainable},
        "tokens_per_sample": {"per_input": tokens, "max_length": cfg.max_length},
        "num_gpus": cfg.num_procs,
        "memory_per_gpu_gib": memory_per_gpu(
            frozen_llm=llm_total - llm_trainable, frozen_other=(total - trainable) - (llm_total - llm_trainable),
            trainable=trainable, largest_layer=largest, num_gpus=cfg.num_procs, precision=cfg.precision,
            quantize=cfg.quantize),
        "memory_note": "weights + gradients + optimizer states per GPU (activations and buffers extra)",
    }


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def print_report(report: dict[str, Any], console: Any = None, *, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(report, sort_keys=False))
        return
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"mmkit train --dry-run: {report['llm']} ({report['stage']}, {report['precision']}"
                        + (f", {report['quantize']}" if report["quantize"] else "") + ")")
    table.add_column("component")
    table.add_column("parameters", justify="right")
    table.add_column("trainable", justify="right")
    for name, c in report["parameters"].items():
        table.add_row(name, f"{_human(c['total'])} ({c['total']:,})", f"{c['trainable']:,}")
    both = report["parameters_all"]
    table.add_row("all", f"{_human(both['total'])} ({both['total']:,})", f"{both['trainable']:,}", style="bold")
    console.print(table)
    per_input = ", ".join(f"{m} {'(varies per input)' if t is None else t}"
                          for m, t in report["tokens_per_sample"]["per_input"].items())
    console.print(f"tokens per sample: {per_input} LLM tokens per input, plus the text; at most "
                  f"{report['tokens_per_sample']['max_length']} (max_length)")
    memory = Table(title=f"model-state memory per GPU on {report['num_gpus']} GPU(s) (--num-procs; "
                         "activations extra)")
    memory.add_column("ZeRO stage")
    memory.add_column("GiB per GPU", justify="right")
    for stage, gib in report["memory_per_gpu_gib"].items():
        memory.add_row(stage, f"{gib:.2f}")
    console.print(memory)

"""Assemble a :class:`MultimodalLM` from a model configuration and the registered plugins."""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import nn

from mmkit.errors import ConfigError
from mmkit.modeling.assembly import MultimodalLM
from mmkit.modeling.factory import build_encoder, build_projector, encoder_options
from mmkit.modeling.lora import LoraSettings, RoutedLora, adapter_names_for
from mmkit.modeling.tokens import ExtendedEmbedding, add_marker_tokens
from mmkit.plugins import PluginHost
from mmkit.prompt import PromptBuilder

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@attrs.frozen
class ModalityChoice:
    """One modality of a model and the components chosen for it."""

    name: str
    encoder: str | None = None  # default: the modality's
    encoder_pretrained: str | None = None  # hub id or local path; None: tiny random init
    encoder_options: dict[str, Any] = attrs.field(factory=dict)
    projector: str | None = None  # default: the modality's
    projector_options: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class ModelConfig:
    llm: str
    modalities: tuple[ModalityChoice, ...]
    lora: LoraSettings | None = LoraSettings()
    #: also adapt the encoders with LoRA (targets from each modality's ``encoder_lora_targets``)
    encoder_lora: bool = False
    max_length: int = 2048
    template: str | None = None
    gradient_checkpointing: bool = False
    #: the tokenizer size before mmkit's markers; set when reloading a saved tokenizer
    first_new_token_id: int | None = None


@attrs.define
class Assembled:
    model: MultimodalLM
    tokenizer: Any
    prompts: PromptBuilder
    config: ModelConfig
    first_new_token_id: int
    components: dict[str, dict[str, Any]]  # per modality: encoder name/identity, projector name/options


def load_llm(path_or_id: str) -> tuple[nn.Module, Any]:
    """The shared LLM and its tokenizer, through ``from_pretrained`` (a hub id or a local path)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # mmkit shows its own progress; per-shard bars are noise here
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        llm = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=torch.float32)
    except OSError as exc:
        raise ConfigError(f"cannot load the LLM {path_or_id!r}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return llm, tokenizer


def linear_module_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def assemble(config: ModelConfig, host: PluginHost, *, tokenizer_path: str | None = None) -> Assembled:
    from transformers import AutoTokenizer

    llm, tokenizer = load_llm(config.llm)
    if tokenizer_path is not None:  # reload: the saved tokenizer already holds the markers
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    llm.requires_grad_(False)
    if config.gradient_checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        llm.config.use_cache = False
    first_new = config.first_new_token_id if config.first_new_token_id is not None else len(tokenizer)

    specs = {choice.name: host.modality(choice.name) for choice in config.modalities}
    if not specs:
        raise ConfigError("choose at least one modality")
    marker_tokens = [tok for spec in specs.values() for tok in spec.markers.special_tokens()]
    add_marker_tokens(tokenizer, marker_tokens)
    num_new = len(tokenizer) - first_new
    embeddings = ExtendedEmbedding(llm.get_input_embeddings(), first_new, max(num_new, 0))
    hidden = llm.get_input_embeddings().weight.shape[1]

    encoders, projectors, components = {}, {}, {}
    for choice in config.modalities:
        spec = specs[choice.name]
        encoder_name = choice.encoder or spec.encoder
        encoder = build_encoder(host, spec, encoder_name=encoder_name, pretrained=choice.encoder_pretrained,
                                options=choice.encoder_options)
        projector_name = choice.projector or spec.projector
        projector = build_projector(host, projector_name, in_dim=encoder.output_dim, out_dim=hidden,
                                    num_tokens=encoder.num_tokens, options=choice.projector_options)
        encoders[choice.name] = encoder
        projectors[choice.name] = projector
        components[choice.name] = {
            "encoder": encoder_name,
            "encoder_pretrained": choice.encoder_pretrained,
            "encoder_options": encoder_options(host, spec, encoder_name=encoder_name,
                                               pretrained=choice.encoder_pretrained, options=choice.encoder_options),
            "encoder_identity": encoder.identity(),
            "projector": projector_name,
            "projector_options": dict(choice.projector_options),
            "tokens_per_input": int(projector.num_output_tokens),
            "plugin": host.provider("modality", choice.name),
        }

    lora = None
    if config.lora is not None:
        settings = config.lora
        if not settings.targets:
            targets = host.lora_targets(llm.config.model_type, linear_module_names(llm))
            settings = attrs.evolve(settings, targets=tuple(targets))
        lora = RoutedLora(llm, adapter_names_for(list(specs), settings.mode), settings)
        config = attrs.evolve(config, lora=settings)
    if config.encoder_lora:
        _add_encoder_lora(encoders, specs, config.lora or LoraSettings())

    placeholder_ids = {m: tokenizer.convert_tokens_to_ids(specs[m].markers.placeholder) for m in specs}
    model = MultimodalLM(lora.model if lora else llm, encoders, projectors, placeholder_ids, embeddings, lora,
                         train_encoders=config.encoder_lora)
    prompts = PromptBuilder(tokenizer, {m: specs[m].markers for m in specs},
                            {m: components[m]["tokens_per_input"] for m in specs},
                            template=config.template, max_length=config.max_length)
    config = attrs.evolve(config, first_new_token_id=first_new)
    return Assembled(model, tokenizer, prompts, config, first_new, components)


def _add_encoder_lora(encoders: dict[str, nn.Module], specs: dict[str, Any], settings: LoraSettings) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    for name, encoder in encoders.items():
        targets = specs[name].encoder_lora_targets
        if not targets:
            raise ConfigError(f"modality {name!r} declares no encoder LoRA targets; encoder LoRA is not available")
        inject_adapter_in_model(LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                           target_modules=list(targets)), encoder, adapter_name="encoder")


def trainable_parameters(model: MultimodalLM, stage: str) -> dict[str, list[nn.Parameter]]:
    """The parameter groups a stage trains: ``align`` trains projectors (and marker embeddings);
    ``instruct`` adds the LoRA adapters (and encoder LoRA when enabled)."""
    if stage not in ("align", "instruct"):
        raise ConfigError(f"unknown stage {stage!r}: use 'align' or 'instruct'")
    model.requires_grad_(False)
    groups: dict[str, list[nn.Parameter]] = {"projectors": [], "embeddings": [], "lora": []}
    groups["projectors"] = list(model.projectors.parameters())
    groups["embeddings"] = [model.embeddings.new_tokens] if model.embeddings.new_tokens.numel() else []
    if stage == "instruct":
        groups["lora"] = [p for n, p in model.named_parameters() if "lora_" in n]
    for params in groups.values():
        for p in params:
            p.requires_grad_(True)
    return {k: v for k, v in groups.items() if v}

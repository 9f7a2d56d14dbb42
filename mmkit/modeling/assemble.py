"""Assemble a :class:`MultimodalLM` from a model configuration and the registered plugins."""

from __future__ import annotations

from typing import Any

import attrs
from torch import nn

from mmkit.errors import ConfigError
from mmkit.modeling.model import MultimodalLM
from mmkit.modeling.components import build_encoder, build_projector, encoder_options
from mmkit.modeling.loading import (attention_candidates, check_quantize, device, full_shape, quantization_config,
                                    torch_dtype, zero3_loading)
from mmkit.modeling.lora import LoraSettings, RoutedLora, adapter_names_for
from mmkit.modeling.tokens import ExtendedEmbedding, add_marker_tokens
from mmkit.plugins import PluginHost
from mmkit.prompt import PromptBuilder
from mmkit.templates import check_early


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
    #: dtype the LLM and the frozen encoders are loaded and kept in (fp32, bf16, fp16)
    precision: str = "fp32"
    #: eager, sdpa or flash_attention_2; None: the best available (see loading.py)
    attn_implementation: str | None = None
    #: 4bit / 8bit bitsandbytes weights for the LLM (QLoRA); None: unquantized
    quantize: str | None = None
    #: recompute the encoders' activations in the backward pass (only when they are trained)
    encoder_gradient_checkpointing: bool = False


@attrs.define
class Assembled:
    model: MultimodalLM
    tokenizer: Any
    prompts: PromptBuilder
    config: ModelConfig
    first_new_token_id: int
    components: dict[str, dict[str, Any]]  # per modality: encoder name/identity, projector name/options


def load_llm(path_or_id: str, *, precision: str = "fp32", attn_implementation: str | None = None,
             quantize: str | None = None) -> tuple[nn.Module, Any]:
    """The shared LLM and its tokenizer, through ``from_pretrained`` (a hub id or a local path), with
    weights in ``precision``'s dtype and the attention kernel chosen (see :mod:`mmkit.modeling.loading`).
    Under an open :func:`~mmkit.modeling.loading.zero3_loading` the weights load partitioned."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # mmkit shows its own progress; per-shard bars are noise here
    from mmkit.demo.llm import resolve_llm

    path_or_id = resolve_llm(path_or_id)  # "tiny": a small random-init LLM with a general tokenizer, offline
    kwargs: dict[str, Any] = {"dtype": torch_dtype(precision)}
    if quantize is not None:
        kwargs["quantization_config"] = quantization_config(quantize, precision)
        kwargs["device_map"] = {"": device()}  # k-bit weights are quantized on the GPU as they load
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        candidates = attention_candidates(attn_implementation, precision)
        for i, attention in enumerate(candidates):
            try:
                llm = AutoModelForCausalLM.from_pretrained(path_or_id, attn_implementation=attention, **kwargs)
                break
            except (ValueError, ImportError) as exc:
                # transformers refuses an implementation the architecture does not support
                if attn_implementation is not None or i == len(candidates) - 1:
                    raise ConfigError(f"cannot load the LLM {path_or_id!r} with attn_implementation "
                                      f"{attention!r}: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot load the LLM {path_or_id!r}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return llm, tokenizer


def linear_module_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def assemble(config: ModelConfig, host: PluginHost, *, tokenizer_path: str | None = None,
             deepspeed_config: dict[str, Any] | None = None) -> Assembled:
    """Build the model. ``deepspeed_config``: the run's DeepSpeed configuration; under ZeRO-3 the LLM
    is created partitioned (``zero.Init``), so no process holds all of its weights."""
    stage = (deepspeed_config or {}).get("zero_optimization", {}).get("stage", 0)
    check_quantize(config.quantize, zero_stage=stage)  # before anything loads
    if config.encoder_gradient_checkpointing and not config.encoder_lora:
        raise ConfigError("encoder_gradient_checkpointing: the encoders are frozen (no backward pass through "
                          "them); it applies with encoder_lora only")
    if tokenizer_path is None:  # the prompt template resolves (or names the likely one) before the LLM loads
        check_early(config.llm, config.template)
    return _assemble(config, host, tokenizer_path=tokenizer_path, deepspeed_config=deepspeed_config)


def _assemble(config: ModelConfig, host: PluginHost, *, tokenizer_path: str | None,
              deepspeed_config: dict[str, Any] | None) -> Assembled:
    llm, tokenizer = _frozen_llm(config, tokenizer_path=tokenizer_path, deepspeed_config=deepspeed_config)
    first_new = config.first_new_token_id if config.first_new_token_id is not None else len(tokenizer)

    specs = {choice.name: host.modality(choice.name) for choice in config.modalities}
    if not specs:
        raise ConfigError("choose at least one modality")
    marker_tokens = [tok for spec in specs.values() for tok in spec.markers.special_tokens()]
    add_marker_tokens(tokenizer, marker_tokens)
    num_new = len(tokenizer) - first_new
    embeddings = ExtendedEmbedding(llm.get_input_embeddings(), first_new, max(num_new, 0))
    hidden = full_shape(llm.get_input_embeddings().weight)[1]

    encoders, projectors, components = {}, {}, {}
    for choice in config.modalities:
        encoders[choice.name], projectors[choice.name], components[choice.name] = _build_modality(
            choice, specs[choice.name], host, config, hidden=hidden)

    lora, config = _routed_lora(llm, list(specs), host, config)
    if config.encoder_lora:
        _add_encoder_lora(encoders, specs, config.lora or LoraSettings())

    placeholder_ids = {m: tokenizer.convert_tokens_to_ids(specs[m].markers.placeholder) for m in specs}
    model = MultimodalLM(lora.model if lora else llm, encoders, projectors, placeholder_ids, embeddings, lora,
                         train_encoders=config.encoder_lora)
    _to_compute_dtype(model, config)
    prompts = PromptBuilder(tokenizer, {m: specs[m].markers for m in specs},
                            {m: components[m]["tokens_per_input"] for m in specs},
                            template=config.template, max_length=config.max_length)
    # the resolved template (a name, or a file's text) is saved with the run: chat / eval / load render alike
    config = attrs.evolve(config, first_new_token_id=first_new, template=prompts.template_ref)
    return Assembled(model, tokenizer, prompts, config, first_new, components)


def _frozen_llm(config: ModelConfig, *, tokenizer_path: str | None,
                deepspeed_config: dict[str, Any] | None) -> tuple[nn.Module, Any]:
    """The LLM, frozen (prepared for k-bit training when quantized, checkpointing when asked), and its
    tokenizer (the saved one on a reload)."""
    from transformers import AutoTokenizer

    # Only the LLM loads partitioned. Encoders are built whole (and partitioned when DeepSpeed wraps
    # the model): their identity hashes their weights, which a partitioned build would not hold.
    with zero3_loading(deepspeed_config):
        llm, tokenizer = load_llm(config.llm, precision=config.precision,
                                  attn_implementation=config.attn_implementation, quantize=config.quantize)
    if tokenizer_path is not None:  # reload: the saved tokenizer already holds the markers
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    llm.requires_grad_(False)
    if config.quantize is not None:
        from peft import prepare_model_for_kbit_training

        # casts norms to fp32, makes inputs require grads for checkpointing through frozen k-bit layers
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=config.gradient_checkpointing,
                                              gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.gradient_checkpointing:
        _enable_checkpointing(llm)
        llm.config.use_cache = False
    return llm, tokenizer


def _build_modality(choice: ModalityChoice, spec: Any, host: PluginHost, config: ModelConfig, *,
                    hidden: int) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """One modality's encoder (prepared for the run) and projector into the LLM's ``hidden`` size, and
    the record of both that is saved with the run."""
    encoder_name = choice.encoder or spec.encoder
    encoder = build_encoder(host, spec, encoder_name=encoder_name, pretrained=choice.encoder_pretrained,
                            options=choice.encoder_options)
    _prepare_encoder(encoder, encoder_name, config)
    projector_name = choice.projector or spec.projector
    projector = build_projector(host, projector_name, in_dim=encoder.output_dim, out_dim=hidden,
                                num_tokens=encoder.num_tokens, options=choice.projector_options,
                                separator=bool(getattr(encoder, "uses_separators", False)))
    component = {
        "encoder": encoder_name,
        "encoder_pretrained": choice.encoder_pretrained,
        "encoder_options": encoder_options(host, spec, encoder_name=encoder_name,
                                           pretrained=choice.encoder_pretrained, options=choice.encoder_options),
        "encoder_identity": encoder.identity(),
        "projector": projector_name,
        "projector_options": dict(choice.projector_options),
        # None: the count follows each input (encoder.num_tokens_for; see encoder.tokens_per_input)
        "tokens_per_input": _fixed_count(projector.num_output_tokens),
        "plugin": host.provider("modality", choice.name),
    }
    return encoder, projector, component


def _routed_lora(llm: nn.Module, modalities: list[str], host: PluginHost,
                 config: ModelConfig) -> tuple[RoutedLora | None, ModelConfig]:
    """The LLM's LoRA adapters (``None`` without LoRA), and the config with the targets filled in (the
    plugins' choice for the architecture when none are given)."""
    if config.lora is None:
        return None, config
    settings = config.lora
    if not settings.targets:
        targets = host.lora_targets(llm.config.model_type, linear_module_names(llm))
        settings = attrs.evolve(settings, targets=tuple(targets))
    lora = RoutedLora(llm, adapter_names_for(modalities, settings.mode), settings)
    return lora, attrs.evolve(config, lora=settings)


def _fixed_count(value: Any) -> int | None:
    return None if value is None else int(value)


def _to_compute_dtype(model: nn.Module, config: ModelConfig) -> None:
    """Projectors, LoRA adapters and marker embeddings in the run's dtype, like the loaded weights:
    DeepSpeed keeps the fp32 master copies of the trainable ones, and under ZeRO-3 (zero.Init) it
    does not cast the module itself, so one dtype must hold for every trainable partition.
    Quantized runs keep peft's choice (norms in fp32)."""
    if config.quantize is not None or config.precision == "fp32":
        return
    dtype = torch_dtype(config.precision)
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype and not hasattr(param, "ds_id"):
            param.data = param.data.to(dtype)


def _prepare_encoder(encoder: nn.Module, name: str, config: ModelConfig) -> None:
    """Frozen encoders are kept in the compute dtype (half the memory of fp32 under bf16); their
    identity (weights hash) was taken as built, so it does not depend on the run's precision."""
    dtype = torch_dtype(config.precision)
    if any(p.is_floating_point() and p.dtype != dtype for p in encoder.parameters()):
        encoder.to(dtype)
    if config.encoder_gradient_checkpointing:
        models = [m for m in encoder.modules() if getattr(m, "supports_gradient_checkpointing", False)]
        if not models:
            raise ConfigError(f"encoder {name!r} has no Hugging Face model that supports gradient checkpointing")
        _enable_checkpointing(models[0])  # the outermost; it covers its submodules


def _enable_checkpointing(model: nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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

"""The pieces every export format shares: the LLM with an adapter merged and mmkit's markers moved
into its vocabulary, the run's other trainable weights, and the model card."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mmkit.errors import ConfigError


ENCODER_LORA = "encoder_lora.safetensors"


def choose_adapter(model: Any, adapter: str | None) -> str | None:
    """The LoRA adapter to merge: the one named, or the run's only one."""
    adapters = list(model.adapters)
    if not adapters:
        if adapter is not None:
            raise ConfigError(f"--adapter {adapter}: this run has no LoRA adapters")
        return None
    if adapter is None:
        if len(adapters) == 1:
            return adapters[0]
        raise ConfigError(f"this run has {len(adapters)} LoRA adapters ({', '.join(adapters)}): choose the one to "
                          "merge with --adapter NAME (text-only prompts use 'text', each modality's its own)")
    if adapter not in adapters:
        raise ConfigError(f"--adapter {adapter}: no such adapter; this run has {', '.join(adapters)}")
    return adapter


def merged_llm_state(model: Any, adapter: str | None) -> dict[str, torch.Tensor]:
    """The base LLM's state dict (its own parameter names) with ``adapter``'s LoRA delta added to
    each adapted weight; the loaded model itself is left untouched."""
    from peft.tuners.lora import LoraLayer

    hf = model.model.llm
    layers = {name: m for name, m in hf.named_modules() if isinstance(m, LoraLayer)}
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, value in hf.state_dict().items():
            if ".lora_" in key:
                continue
            if ".base_layer." in key:
                layer_name, _, param = key.partition(".base_layer.")
                key = f"{layer_name}.{param}"
                if adapter is not None and param == "weight":
                    delta = layers[layer_name].get_delta_weight(adapter)
                    value = (value.float() + delta.float()).to(value.dtype)
            state[key] = value
    return state


def marker_ids(model: Any) -> dict[str, int]:
    """mmkit's marker tokens (placeholders, begin/end) and their ids."""
    first_new = model.assembled.first_new_token_id
    vocab = model.tokenizer.get_vocab()
    return {tok: i for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i >= first_new}


def standalone_llm(model: Any, adapter: str | None) -> Any:
    """A plain Hugging Face causal LM: the base LLM with ``adapter`` merged and the vocabulary
    extended by mmkit's markers (their trained embedding rows copied in). The output rows of the
    markers (and of any padding rows past the tokenizer) are suppressed in its generation config,
    as mmkit never generates them."""
    from transformers import AutoModelForCausalLM

    hf = model.model.llm
    state = merged_llm_state(model, adapter)
    config = hf.config
    if _head_adapted(hf, adapter) and getattr(config, "tie_word_embeddings", False):
        # The adapter changed the output head, so it is no longer the input embedding: a tied
        # config would re-tie it on load and save, dropping the head's delta. Keep both weights.
        config = copy.deepcopy(config)
        config.tie_word_embeddings = False
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config)
    # Not strict only so tied weights (absent from the state by design) can be told apart; every
    # other missing or unexpected key is refused just below.
    missing, unexpected = llm.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if _is_tied(llm, k)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"merged LLM state does not match its architecture: missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)}")
    llm.tie_weights()
    first_new = model.assembled.first_new_token_id
    new_rows = model.model.embeddings.new_tokens.detach()
    old_rows = llm.get_input_embeddings().weight.shape[0]
    rows = max(old_rows, first_new + new_rows.shape[0])
    if rows != old_rows:
        llm.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        embed = llm.get_input_embeddings().weight
        embed[first_new: first_new + new_rows.shape[0]] = new_rows.to(embed.dtype)
        out = llm.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != embed.data_ptr() and rows != old_rows:
            out.weight[old_rows:] = 0.0  # never produced: suppressed below
    llm.config.vocab_size = rows
    gen = llm.generation_config
    gen.suppress_tokens = list(range(first_new, rows)) or None
    stops = sorted(model.prompts.stop_token_ids)
    gen.eos_token_id = stops if len(stops) > 1 else (stops[0] if stops else None)
    gen.pad_token_id = model.tokenizer.pad_token_id
    llm.eval()
    return llm


def _head_adapted(hf: Any, adapter: str | None) -> bool:
    """Whether ``adapter``'s LoRA adapts the LLM's output head (``lm_head`` in the targets)."""
    from peft.tuners.lora import LoraLayer

    head = hf.get_output_embeddings()
    return adapter is not None and isinstance(head, LoraLayer) and (
        adapter in head.lora_A or adapter in getattr(head, "lora_embedding_A", {}))


def _is_tied(llm: Any, key: str) -> bool:
    out = llm.get_output_embeddings()
    return bool(getattr(llm.config, "tie_word_embeddings", False)) and out is not None and key.endswith(".weight") \
        and any(key == f"{name}.weight" for name, m in llm.named_modules() if m is out)


def save_module_weights(path: Path, modules: Mapping[str, torch.nn.Module]) -> dict[str, list[int]]:
    """``{prefix: module}`` -> one safetensors file with keys ``prefix.param``; returns the shapes."""
    tensors = {f"{prefix}.{k}": v.detach().to("cpu").contiguous() for prefix, m in modules.items()
               for k, v in m.state_dict().items()}
    if tensors:
        save_file(tensors, str(path), metadata={"format": "pt"})
    return {k: list(v.shape) for k, v in tensors.items()}


def write_components(out: Path, model: Any) -> dict[str, Any]:
    """Projectors, marker embeddings and random-init encoders as safetensors, with the index that
    says how they fit together (``mmkit_export.json`` is written by the caller)."""
    from mmkit import __version__

    net = model.model
    components = model.assembled.components
    files: dict[str, Any] = {}
    files["projectors.safetensors"] = save_module_weights(out / "projectors.safetensors", dict(net.projectors))
    random_init = {m: net.encoders[m] for m, c in components.items() if c.get("encoder_pretrained") is None}
    if random_init:  # whole encoders: their encoder LoRA weights (if any) are among them
        files["encoders.safetensors"] = save_module_weights(out / "encoders.safetensors", random_init)
    # A pretrained encoder is named, not written; the LoRA it was trained with (encoder_lora) must be
    # written beside it, or whoever rebuilds from the export runs the un-adapted encoder.
    adapted = {f"{m}.{k}": v.detach().to("cpu").contiguous() for m in components if m not in random_init
               for k, v in net.encoders[m].state_dict().items() if ".lora_" in k}
    if adapted:
        save_file(adapted, str(out / ENCODER_LORA), metadata={"format": "pt"})
        files[ENCODER_LORA] = {k: list(v.shape) for k, v in adapted.items()}
    markers = marker_ids(model)
    if markers:
        rows = net.embeddings.new_tokens.detach().to("cpu").contiguous()
        save_file({"embeddings": rows}, str(out / "markers.safetensors"), metadata={"format": "pt"})
        files["markers.safetensors"] = {"embeddings": list(rows.shape)}
    host_markers = model.markers
    return {
        "mmkit_version": __version__,
        "base_llm": model.assembled.config.llm,
        "first_new_token_id": model.assembled.first_new_token_id,
        "markers": markers,
        "template": model.prompts.template,
        "stop_token_ids": sorted(model.prompts.stop_token_ids),
        "adapters": list(model.adapters),
        "lora": _lora_settings(model),
        "modalities": {
            m: {**{k: c[k] for k in ("encoder", "encoder_pretrained", "encoder_options", "projector",
                                     "projector_options", "tokens_per_input", "plugin")},
                "placeholder": host_markers[m].placeholder, "begin": host_markers[m].begin, "end": host_markers[m].end,
                "encoder_weights": "encoders.safetensors" if m in random_init else c["encoder_pretrained"],
                "encoder_lora": _encoder_lora(net.encoders[m], "encoders.safetensors" if m in random_init
                                              else ENCODER_LORA)}
            for m, c in components.items()},
        "files": files,
    }


def _encoder_lora(encoder: Any, weights: str) -> dict[str, Any] | None:
    """How to re-create an encoder's LoRA (``None`` without): inject peft's ``LoraConfig`` of these
    settings under ``adapter_name`` (``peft.inject_adapter_in_model``), then load ``weights``."""
    configs = getattr(encoder, "peft_config", None) or {}
    if not configs:
        return None
    (name, config), = configs.items()  # mmkit injects one adapter, "encoder"
    return {"adapter_name": name, "r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "target_modules": (config.target_modules if isinstance(config.target_modules, str)
                               else sorted(config.target_modules)), "weights": weights}


def encoder_lora_contents(index: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The model card's line for the encoders' LoRA weights, when the run trained any."""
    if ENCODER_LORA not in index["files"]:
        return []
    return [(ENCODER_LORA, "the trained encoder LoRA of pretrained encoders, keys `<modality>.<param>`; inject "
                          "the LoRA of `modalities.<m>.encoder_lora` in mmkit_export.json, then load them")]


def _lora_settings(model: Any) -> dict[str, Any] | None:
    import attrs

    lora = model.assembled.config.lora
    return None if lora is None else attrs.asdict(lora)


def write_index(out: Path, index: Mapping[str, Any]) -> None:
    (out / "mmkit_export.json").write_text(json.dumps(index, indent=2, sort_keys=True, default=str) + "\n",
                                           encoding="utf-8")


def write_model_card(out: Path, *, title: str, summary: str, contents: Sequence[tuple[str, str]], usage: str,
                     model: Any, notes: Sequence[str] = ()) -> None:
    """A short README.md: what the folder holds, where it came from, and how to load it."""
    from mmkit import __version__

    components = model.assembled.components
    lines = [f"# {title}", "", summary, "", "## Contents", ""]
    lines += [f"- `{name}`: {what}" for name, what in contents]
    lines += ["", "## Source", "",
              f"- exported by mmkit {__version__} from a run on the base LLM `{model.assembled.config.llm}`",
              "- modalities: " + ", ".join(
                  f"{m} (encoder `{c['encoder']}`"
                  + (f" from `{c['encoder_pretrained']}`" if c.get("encoder_pretrained") else ", random init")
                  + f", projector `{c['projector']}`, "
                  + (f"{c['tokens_per_input']} tokens per input)" if c["tokens_per_input"] is not None
                     else "a token count per input)")  # a variable-size encoder (contract 1.1)
                  for m, c in components.items()),
              "- LoRA adapters: " + (", ".join(model.adapters) if model.adapters else "none"),
              "", "## Loading", "", "```python", usage.strip(), "```", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")

"""mmkit's own export formats, for any modality: ``peft`` (adapters as standard PEFT folders) and
``merged`` (one adapter merged into a plain Hugging Face causal LM)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from mmkit.errors import ConfigError
from mmkit.export.llm import (
    choose_adapter,
    encoder_lora_contents,
    standalone_llm,
    write_components,
    write_index,
    write_model_card,
)
from mmkit.export.template import run_tokenizer


def export_peft(model: Any, out: Path, *, adapter: str | None = None) -> None:
    """``adapters/<name>/`` per LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``,
    what ``PeftModel.from_pretrained(base, path)`` and vLLM's multi-LoRA serving load), plus the
    projectors, marker embeddings and random-init encoders with the ``mmkit_export.json`` index."""
    from peft import get_peft_model_state_dict

    lora = model.model.lora
    if lora is None:
        raise ConfigError("this run has no LoRA adapters: use --to merged for its LLM, projectors and markers")
    names = [choose_adapter(model, adapter)] if adapter is not None else list(lora.adapters)
    base = model.assembled.config.llm
    if Path(base).is_dir():  # a local folder named from the export's cwd: absolute, so the adapters load anywhere
        base = str(Path(base).resolve())
    for name in names:
        folder = out / "adapters" / name
        folder.mkdir(parents=True)
        state = get_peft_model_state_dict(lora.peft_model, adapter_name=name)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()},
                  str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = copy.deepcopy(lora.peft_model.peft_config[name])
        config.base_model_name_or_path = base
        config.inference_mode = True
        config.save_pretrained(str(folder))
    index = write_components(out, model)
    index["format"] = "peft"
    index["exported_adapters"] = {n: f"adapters/{n}" for n in names}
    write_index(out, index)
    tokenizer, template_notes = run_tokenizer(model)
    tokenizer.save_pretrained(out / "tokenizer")
    routing = ("one shared adapter for every prompt" if len(lora.adapters) == 1 else
               "per-modality adapters: a prompt uses its first modality's adapter, text-only prompts `text`")
    write_model_card(
        out, title="mmkit run: LoRA adapters (PEFT)", model=model,
        summary=f"The run's LoRA adapters as standard PEFT folders on the base LLM `{base}` ({routing}), "
                "with the projectors, the trained embeddings of mmkit's marker tokens and the encoders "
                "as safetensors.",
        contents=[*((f"adapters/{n}/", f"PEFT LoRA adapter `{n}`") for n in names),
                  ("projectors.safetensors", "projector weights, keys `<modality>.<param>`"),
                  ("markers.safetensors", "`embeddings`: one row per marker token, ids in `mmkit_export.json`"),
                  ("encoders.safetensors", "random-init encoder weights (pretrained encoders are named instead)"),
                  *encoder_lora_contents(index),
                  ("tokenizer/", "the base tokenizer with the marker tokens added and the run's chat template"),
                  ("mmkit_export.json", "how the pieces fit: markers and ids, encoders, projectors, template")],
        usage=f"""
from transformers import AutoModelForCausalLM
from peft import PeftModel

base = AutoModelForCausalLM.from_pretrained({base!r})
llm = PeftModel.from_pretrained(base, "adapters/{names[0]}")
# vLLM: LLM(model={base!r}, enable_lora=True) with LoRARequest("{names[0]}", 1, "adapters/{names[0]}")
""",
        notes=["The adapters change the LLM only; prompts with modality inputs also need the encoder, projector "
               "and marker embeddings (or `mmkit chat` on the run itself).", *template_notes])


def export_merged(model: Any, out: Path, *, adapter: str | None = None) -> None:
    """``llm/``: the base LLM with one adapter merged and the marker tokens in its vocabulary, a plain
    Hugging Face causal LM (safetensors, config, tokenizer); beside it the encoders, projectors and
    index."""
    name = choose_adapter(model, adapter)
    llm = standalone_llm(model, name)
    llm.save_pretrained(out / "llm", safe_serialization=True)
    tokenizer, template_notes = run_tokenizer(model)
    tokenizer.save_pretrained(out / "llm")
    index = write_components(out, model)
    index["format"] = "merged"
    index["merged_adapter"] = name
    write_index(out, index)
    write_model_card(
        out, title="mmkit run: merged LLM", model=model,
        summary=(f"The base LLM `{model.assembled.config.llm}` with the LoRA adapter `{name}` merged into its "
                 if name else f"The base LLM `{model.assembled.config.llm}` (no LoRA) with ")
        + "weights and mmkit's marker tokens in its vocabulary: a plain Hugging Face causal LM. The encoders and "
          "projectors that turn inputs into its embeddings are beside it.",
        contents=[("llm/", "config.json, model.safetensors, generation_config.json, tokenizer with the markers "
                           "and the run's chat template"),
                  ("projectors.safetensors", "projector weights, keys `<modality>.<param>`"),
                  ("markers.safetensors", "the marker embeddings (already inside llm/; kept for reference)"),
                  ("encoders.safetensors", "random-init encoder weights (pretrained encoders are named instead)"),
                  *encoder_lora_contents(index),
                  ("mmkit_export.json", "markers and ids, encoders, projectors, template")],
        usage="""
from transformers import AutoModelForCausalLM, AutoTokenizer

llm = AutoModelForCausalLM.from_pretrained("llm")
tokenizer = AutoTokenizer.from_pretrained("llm")
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                       add_generation_prompt=True)
ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
print(tokenizer.decode(llm.generate(**ids, max_new_tokens=32)[0], skip_special_tokens=True))
""",
        notes=["Marker token ids (and any vocabulary padding rows) are listed in generation_config's "
               "`suppress_tokens`: the model never generates them, as in mmkit.",
               "Multimodal prompts: the placeholder's slots take the projector's output in place of token "
               "embeddings (`inputs_embeds`); see mmkit_export.json for the tokens per input.", *template_notes])

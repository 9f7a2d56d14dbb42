"""The ``llava-hf`` export format: a folder stock ``LlavaForConditionalGeneration.from_pretrained``
and ``AutoProcessor.from_pretrained`` load, computing what the mmkit run computes.

LLaVA's pieces are fixed, so only runs made of them are exported: one ``image`` modality on the
``clip`` encoder, an ``mlp`` projector of depth 1 or 2 (or ``linear``), and LoRA that is the same for
every prompt (shared, merged into the LLM). Anything else is refused with the reason.

- Vision tower: the run's CLIP cut after its feature layer (mmkit never runs the later layers), so
  ``vision_feature_layer = -1``; CLS dropped -> strategy ``default``, kept -> ``full``.
- Projector: LLaVA's ``linear_1 -> act -> linear_2``. mmkit's ``mlp`` (depth 2) is exactly that with
  ``gelu``; a single linear map becomes ``linear_1`` with act ``linear`` (identity) and
  ``linear_2 = I`` (exact: one product by 1.0 plus zeros).
- Prompt: the chat template is the run's, wrapping each ``<image>`` in the begin/end markers (the
  processor then expands ``<image>`` to the feature tokens, as mmkit's prompt builder does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODALITY = "image"


def why_not(meta: dict[str, Any]) -> str | None:
    """The reason a run (its ``mmkit.json``) cannot be a LLaVA checkpoint, or ``None``."""
    modalities = meta.get("modalities", {})
    if set(modalities) != {MODALITY}:
        others = sorted(set(modalities) - {MODALITY})
        return (f"LLaVA holds one image modality; this run has {', '.join(sorted(modalities))}"
                + (f" (no place for {', '.join(others)})" if others else ""))
    comp = modalities[MODALITY]
    if comp.get("encoder") != "clip":
        return f"LLaVA's vision tower is CLIP; this run's image encoder is {comp.get('encoder')!r}"
    projector, options = comp.get("projector"), comp.get("projector_options") or {}
    if projector == "mlp" and int(options.get("depth", 2)) not in (1, 2):
        return f"LLaVA's projector has two linear layers; this run's mlp has depth {options.get('depth')}"
    if projector not in ("mlp", "linear"):
        return (f"LLaVA's projector is Linear-GELU-Linear; this run's {projector!r} projector has no place there"
                + (" (a resampler changes the number of image tokens and has attention layers)"
                   if projector == "resampler" else ""))
    if meta.get("encoder_lora"):
        return "the run adapted the CLIP encoder with LoRA; the llava-hf export does not merge encoder LoRA"
    if (comp.get("encoder_options") or {}).get("anyres"):
        return ("the run tiles images at any resolution (anyres: true, as LLaVA-NeXT); LlavaForConditionalGeneration "
                "takes one fixed-size image per slot")
    return None


def _projector_layers(projector: Any) -> tuple[Any, Any | None, str]:
    """(linear_1, linear_2 or None, activation name) of an ``mlp`` / ``linear`` projector."""
    from torch import nn

    if hasattr(projector, "mlp"):
        layers = list(projector.mlp)
        if len(layers) == 3 and isinstance(layers[1], nn.GELU) and layers[1].approximate == "none":
            return layers[0], layers[2], "gelu"
        if len(layers) == 1:
            return layers[0], None, "linear"
    elif hasattr(projector, "proj") and isinstance(projector.proj, nn.Linear):
        return projector.proj, None, "linear"
    from mmkit.export import ExportRefused

    raise ExportRefused(f"the projector {type(projector).__name__} is not Linear-GELU-Linear or one Linear")


def chat_template(template: str, placeholder: str, begin: str | None, end: str | None) -> str:
    """The run's chat template, fed messages whose content may be a string or a list of
    ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts (an image part renders as
    mmkit's ``generate`` prompt does: placeholder then a newline), with each placeholder wrapped in
    the begin/end markers."""
    wrapped = f"{begin or ''}{placeholder}{end or ''}"
    prelude = (
        "{%- set ns = namespace(msgs=[]) -%}"
        "{%- for m in messages -%}"
        "{%- if m['content'] is string -%}{%- set text = m['content'] -%}"
        "{%- else -%}{%- set parts = namespace(text='') -%}"
        "{%- for c in m['content'] -%}"
        f"{{%- if c['type'] == 'image' -%}}{{%- set parts.text = parts.text ~ {placeholder + chr(10)!r} -%}}"
        "{%- elif c['type'] == 'text' -%}{%- set parts.text = parts.text ~ c['text'] -%}{%- endif -%}"
        "{%- endfor -%}{%- set text = parts.text -%}{%- endif -%}"
        f"{{%- set ns.msgs = ns.msgs + [{{'role': m['role'], 'content': text | replace({placeholder!r}, {wrapped!r})}}] -%}}"
        "{%- endfor -%}"
        "{%- set messages = ns.msgs -%}"
    )
    return prelude + template


def export_llava(model: Any, out: Path, *, adapter: str | None = None) -> None:
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from mmkit.export import ExportRefused
    from mmkit.export.llm import choose_adapter, standalone_llm, write_model_card
    from mmkit.export.template import run_chat_template

    reason = why_not({"modalities": model.assembled.components, "encoder_lora": model.assembled.config.encoder_lora})
    if reason:
        raise ExportRefused(reason)
    lora = model.model.lora
    if lora is not None and len(lora.adapters) > 1:
        # Per-modality adapters: LLaVA has one LLM, so they must agree on every prompt LLaVA serves.
        others = [n for n in lora.adapters if n != MODALITY]
        if any(not all(torch.equal(a, b) for a, b in zip(lora.parameters(MODALITY), lora.parameters(n), strict=True))
               for n in others):
            raise ExportRefused(f"the run has per-modality LoRA adapters ({', '.join(lora.adapters)}) that differ: "
                                "text-only prompts use the 'text' adapter and image prompts the 'image' one, but a "
                                "LLaVA checkpoint has one LLM for both; use --to peft or --to merged --adapter NAME")
        adapter = adapter or MODALITY
    name = choose_adapter(model, adapter)

    net = model.model
    encoder, projector = net.encoders[MODALITY], net.projectors[MODALITY]
    markers = model.markers[MODALITY]
    linear_1, linear_2, act = _projector_layers(projector)
    llm = standalone_llm(model, name)
    vision = encoder.model
    kept_layers = len(getattr(vision, "vision_model", vision).encoder.layers)
    vision_config = vision.config.to_dict()
    vision_config["num_hidden_layers"] = kept_layers
    strategy = "default" if encoder.drop_cls else "full"
    config = LlavaConfig(
        vision_config=vision_config, text_config=llm.config.to_dict(),
        image_token_index=model.tokenizer.convert_tokens_to_ids(markers.placeholder),
        image_seq_length=int(encoder.num_tokens), projector_hidden_act=act,
        vision_feature_select_strategy=strategy, vision_feature_layer=-1, multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)))
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    llava.model.vision_tower = vision
    llava.model.language_model = llm.base_model
    llava.lm_head = llm.get_output_embeddings()
    hidden = llm.get_input_embeddings().weight.shape[1]
    proj = llava.model.multi_modal_projector
    proj.linear_1 = linear_1
    if linear_2 is None:
        identity = torch.nn.Linear(hidden, hidden, bias=True, dtype=linear_1.weight.dtype)
        with torch.no_grad():
            identity.weight.copy_(torch.eye(hidden))
            identity.bias.zero_()
        linear_2 = identity
    proj.linear_2 = linear_2
    meta_left = [n for n, p in llava.named_parameters() if p.is_meta]
    if meta_left:
        raise RuntimeError(f"llava-hf export left parameters unset: {meta_left[:5]}")
    llava.generation_config = llm.generation_config
    llava.eval()
    llava.save_pretrained(out, safe_serialization=True)

    patch = vision.config.patch_size
    processor = LlavaProcessor(
        image_processor=encoder.processor, tokenizer=model.tokenizer, patch_size=int(patch if isinstance(patch, int)
                                                                                     else patch[0]),
        vision_feature_select_strategy=strategy, num_additional_image_tokens=1, image_token=markers.placeholder,
        # the run's template as the merged / peft tokenizers carry it (messages trimmed, fixed date, ...)
        chat_template=chat_template(run_chat_template(model), markers.placeholder, markers.begin, markers.end))
    processor.save_pretrained(out)
    write_model_card(
        out, title="mmkit run: LLaVA (Hugging Face format)", model=model,
        summary="A LlavaForConditionalGeneration checkpoint of the run: the CLIP vision tower cut at the run's "
                "feature layer, its projector, and the LLM with the LoRA adapter merged and mmkit's marker "
                "tokens in the vocabulary. The processor and chat template reproduce mmkit's prompt.",
        contents=[("config.json, model.safetensors", "LlavaForConditionalGeneration"),
                  ("processor / tokenizer / chat template files", "AutoProcessor (CLIP image processor, tokenizer "
                                                                   "with markers, chat template)"),
                  ("generation_config.json", "stop tokens; marker ids suppressed (never generated)")],
        usage="""
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

model = LlavaForConditionalGeneration.from_pretrained(".")
processor = AutoProcessor.from_pretrained(".")
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open("photo.png"), text=prompt, return_tensors="pt", add_special_tokens=False)
out = model.generate(**inputs, max_new_tokens=32)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
""",
        notes=[f"vision_feature_layer -1 on a {kept_layers}-layer tower = the run's feature_layer "
               f"{encoder.feature_layer}; vision_feature_select_strategy {strategy!r} "
               f"({'CLS dropped' if encoder.drop_cls else 'CLS kept'}); {encoder.num_tokens} tokens per image.",
               f"Each image is wrapped as {markers.begin or ''}{markers.placeholder}{markers.end or ''} by the chat "
               "template; the prompt already holds its special tokens, so tokenise with add_special_tokens=False.",
               "The image processor is CLIP's Pillow one, as in training; where torchvision is installed, "
               "`AutoProcessor.from_pretrained(path, backend=\"pil\")` keeps preprocessing bit-identical.",
               "The LoRA adapter " + (f"`{name}` is merged" if name else "is absent (none trained)") + "."])

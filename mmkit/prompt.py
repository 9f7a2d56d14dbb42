"""The one prompt builder: training and inference render conversations through the same code.

A conversation is rendered with the LLM's chat template (or :data:`DEFAULT_TEMPLATE` when the
tokenizer has none), tokenised once with character offsets, and each modality placeholder token is
expanded to ``begin + N slots + end`` where the N slots later receive the projected features.
Labels keep only the assistant turns' tokens (their text and the template's end-of-turn marker).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import attrs

from mmkit.data.records import ASSISTANT, Sample, Turn
from mmkit.errors import ConfigError, DataError
from mmkit.specs import MarkerSpec

IGNORE_INDEX = -100

#: Used when the tokenizer has no chat template (and by the embedded demo's tokenizer).
DEFAULT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|> {{ m['content'] }} <|end|>\n"
    "{% elif m['role'] == 'user' %}<|user|> {{ m['content'] }} <|end|>\n"
    "{% else %}<|assistant|> {{ m['content'] }} <|end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
DEFAULT_TEMPLATE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


@attrs.frozen
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    #: modality -> number of inputs, in placeholder order (the collator stacks inputs in this order)
    input_counts: Mapping[str, int]


class PromptBuilder:
    """Renders and tokenises conversations; expands modality placeholders.

    ``tokens_per_input[m]`` is how many feature tokens one input of modality ``m`` becomes (the
    projector's output count), so lengths here already include modality tokens.
    """

    def __init__(self, tokenizer: Any, markers: Mapping[str, MarkerSpec], tokens_per_input: Mapping[str, int],
                 *, template: str | None = None, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.markers = dict(markers)
        self.tokens_per_input = dict(tokens_per_input)
        self.template = template or getattr(tokenizer, "chat_template", None) or DEFAULT_TEMPLATE
        self.max_length = max_length
        self._placeholder_ids: dict[int, str] = {}
        self._expansion: dict[int, list[int]] = {}
        for modality, spec in self.markers.items():
            ph = self._token_id(spec.placeholder)
            begin = [self._token_id(spec.begin)] if spec.begin else []
            end = [self._token_id(spec.end)] if spec.end else []
            self._placeholder_ids[ph] = modality
            self._expansion[ph] = begin + [ph] * self.tokens_per_input[modality] + end

    def _token_id(self, token: str) -> int:
        ids = self.tokenizer.convert_tokens_to_ids([token])
        if not ids or ids[0] is None or ids[0] == self.tokenizer.unk_token_id:
            raise ConfigError(f"marker {token!r} is not a token of the tokenizer; add the markers first")
        return ids[0]

    # -- rendering ---------------------------------------------------------------------------
    @staticmethod
    def messages(turns: Sequence[Turn], system: str | None) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": system}] if system else []
        msgs += [{"role": t.role, "content": t.text} for t in turns]
        return msgs

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _assistant_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The full text and the character spans of each assistant turn (text + end-of-turn)."""
        full = self.render(messages, add_generation_prompt=False)
        spans = []
        for i, msg in enumerate(messages):
            if msg["role"] != ASSISTANT:
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1], add_generation_prompt=False)
            if not through.startswith(prefix) or not full.startswith(through):
                raise ConfigError("the chat template renders a conversation differently from its prefixes, "
                                  "so assistant turns cannot be located; declare a template with --prompt-template")
            spans.append((len(prefix), len(through)))
        return full, spans

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def _expand(self, ids: Sequence[int], labels: Sequence[int]) -> tuple[list[int], list[int], dict[str, int]]:
        out_ids: list[int] = []
        out_labels: list[int] = []
        counts: dict[str, int] = {}
        for tok, lab in zip(ids, labels, strict=True):
            modality = self._placeholder_ids.get(tok)
            if modality is None:
                out_ids.append(tok)
                out_labels.append(lab)
                continue
            expansion = self._expansion[tok]
            out_ids.extend(expansion)
            out_labels.extend([IGNORE_INDEX] * len(expansion))
            counts[modality] = counts.get(modality, 0) + 1
        return out_ids, out_labels, counts

    # -- the two entry points ----------------------------------------------------------------
    def encode_sample(self, sample: Sample) -> EncodedSample:
        """Training: the whole conversation; loss on assistant turns only."""
        messages = self.messages(sample.turns, sample.system)
        text, spans = self._assistant_spans(messages)
        ids, offsets = self._tokenize(text)
        labels = []
        for tok, (start, end) in zip(ids, offsets, strict=True):
            inside = any(s <= start and end <= e and end > start for s, e in spans)
            labels.append(tok if inside else IGNORE_INDEX)
        if self.tokenizer.eos_token_id is not None and not self._ends_with_eos(ids):
            # Templates without an end-of-turn token: teach the model to stop with EOS.
            ids.append(self.tokenizer.eos_token_id)
            labels.append(self.tokenizer.eos_token_id)
        input_ids, labels, counts = self._expand(ids, labels)
        self._check(sample, counts, len(input_ids))
        if all(lab == IGNORE_INDEX for lab in labels):
            raise DataError(sample.source, sample.index, "no assistant tokens to learn from")
        return EncodedSample(input_ids, labels, counts)

    def encode_prompt(self, turns: Sequence[Turn], system: str | None = None) -> EncodedSample:
        """Inference: the conversation so far, ending with the generation prompt."""
        text = self.render(self.messages(turns, system), add_generation_prompt=True)
        ids, _ = self._tokenize(text)
        input_ids, labels, counts = self._expand(ids, [IGNORE_INDEX] * len(ids))
        return EncodedSample(input_ids, labels, counts)

    def _ends_with_eos(self, ids: Sequence[int]) -> bool:
        # The template's end-of-turn token counts as a stop token when the template has one.
        return bool(ids) and ids[-1] in self.stop_token_ids

    @cached_property
    def stop_token_ids(self) -> frozenset[int]:
        stops = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        probe = self.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], False)
        ids, _ = self._tokenize(probe)
        # The last non-whitespace token of a rendered assistant turn is its end-of-turn marker.
        for tok in reversed(ids):
            if self.tokenizer.decode([tok]).strip():
                # (a word-level tokenizer may not know the probe's text: <unk> is no end-of-turn)
                if tok in self.tokenizer.all_special_ids and tok != self.tokenizer.unk_token_id:
                    stops.add(tok)
                break
        return frozenset(stops)

    def _check(self, sample: Sample, counts: Mapping[str, int], length: int) -> None:
        for modality, paths in sample.inputs.items():
            if counts.get(modality, 0) != len(paths):
                raise DataError(sample.source, sample.index,
                                f"{len(paths)} {modality} input(s) but {counts.get(modality, 0)} placeholder token(s) "
                                "after tokenisation")
        if self.max_length is not None and length > self.max_length:
            raise DataError(sample.source, sample.index,
                            f"{length} tokens including modality tokens, over the maximum {self.max_length}")

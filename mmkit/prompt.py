"""The one prompt builder: training and inference render conversations through the same code.

A conversation is rendered with the run's chat template (see :mod:`mmkit.templates`: the
tokenizer's own, a named one, or a file), tokenised once with character offsets, and each modality
placeholder token is expanded to ``begin + N slots + end`` where the N slots later receive the
projected features. N is the modality's fixed count, or (a variable-size encoder, contract 1.1) the
count of that input, given per input in placeholder order (``input_tokens``).

Labels come from token positions in that one tokenisation. The character spans that carry loss are

- the template's ``{% generation %}`` blocks when it has them (every library template does), or
- for a template without them (most tokenizers' own), each assistant message's text located in the
  rendering exactly (each message is rendered once more as a unique marker and substituted back,
  which must give the same text), extended through the first special token after it: the
  template's end-of-turn token.

Either span starts where the turn's inference prompt (the messages before it with the generation
prompt) ends, when that prompt is a prefix of the rendering: what lies between the prompt and the
answer text (the space of ``ASSISTANT: 3``, a lone ``▁`` in Llama-2's vocabulary) is what generation
produces first, so it is learned, and nothing of the prompt is.

A token is learned when it overlaps such a span, so an answer's first token is learned even when it
carries the space before it (``▁Yes``); separators outside the spans never are. A template with no
end-of-turn token gets EOS right after the last answer's last token (its trailing separator is cut:
unlearned, it would stand between the answer and the stop). BOS appears exactly once when the
tokenizer uses one. Tokens after the last learned token are dropped in training (a causal LM's loss
cannot depend on them).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from functools import cache, cached_property
from typing import Any

import attrs

from mmkit.records import ASSISTANT, Sample, Turn
from mmkit.errors import ConfigError, DataError
from mmkit.specs import MarkerSpec
from mmkit.templates import ChatTemplate, resolve

IGNORE_INDEX = -100
_MARK = "\ue000{}\ue001"  # private-use characters: never in real text, never merged by a tokenizer rule
#: the date a template that reads today's date sees (Llama-3.2's own fallback, "26 Jul 2024"); an exported
#: template must render the same (date_string = TEMPLATE_DATE.strftime("%d %b %Y"))
TEMPLATE_DATE = datetime.datetime(2024, 7, 26)


@cache  # rendered into every prompt: built once
def fixed_date_prelude() -> str:
    """Jinja defining, for the template after it, ``date_string`` (unless the caller passes one) and a
    ``strftime_now`` macro that formats :data:`TEMPLATE_DATE` (the usual directives). A callable
    cannot be passed instead: transformers' renderer turns every non-JSON argument into an inert
    string, and the template's call would then fail."""
    escaped = "\ue000"  # a literal '%%' while the directives are replaced
    fmt = f"fmt | replace('%%', {escaped!r})"
    for directive in "YmdbBaAyHMSjIpeU":
        fmt += f" | replace('%{directive}', {TEMPLATE_DATE.strftime('%' + directive)!r})"
    fmt += f" | replace({escaped!r}, '%')"
    date = TEMPLATE_DATE.strftime("%d %b %Y")
    return ("{%- macro strftime_now(fmt) -%}{{- " + fmt + " -}}{%- endmacro -%}"
            f"{{%- if date_string is not defined -%}}{{%- set date_string = {date!r} -%}}{{%- endif -%}}")


#: per modality, the slots of each input in placeholder order (what ``input_tokens`` arguments take)
InputTokens = Mapping[str, Sequence[int]]


@attrs.frozen
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    #: modality -> number of inputs, in placeholder order (the collator stacks inputs in this order)
    input_counts: Mapping[str, int]
    #: modality -> the slots each input got, in placeholder order
    input_tokens: Mapping[str, tuple[int, ...]] = attrs.field(factory=dict)


class PromptBuilder:
    """Renders and tokenises conversations; expands modality placeholders.

    ``tokens_per_input[m]`` is how many feature tokens one input of modality ``m`` becomes (the
    projector's output count), so lengths here already include modality tokens; ``None``: the count
    differs per input (a variable-size encoder with a token-wise projector), and every encode call
    of a sample with such inputs gives ``input_tokens`` (per modality, each input's count in
    placeholder order; see :func:`mmkit.modeling.encoder.tokens_per_input`). ``template``: see
    :func:`mmkit.templates.resolve`; a tokenizer with no chat template needs one.
    """

    def __init__(self, tokenizer: Any, markers: Mapping[str, MarkerSpec], tokens_per_input: Mapping[str, int | None],
                 *, template: str | None = None, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.markers = dict(markers)
        self.tokens_per_input = dict(tokens_per_input)
        own = getattr(tokenizer, "chat_template", None)
        # the vocabulary only names the likely template in the error (get_vocab is slow on big vocabularies)
        self.chat: ChatTemplate = resolve(template, own, llm=getattr(tokenizer, "name_or_path", None),
                                          vocab=None if (template or own) else tokenizer.get_vocab())
        self.template = self.chat.source
        #: what a run saves so chat / eval / load render with the same template
        self.template_ref = self.chat.ref
        self.max_length = max_length
        self._placeholder_ids: dict[int, str] = {}
        self._expansion: dict[int, tuple[list[int], list[int]]] = {}  # placeholder -> (begin, end)
        for modality, spec in self.markers.items():
            ph = self._token_id(spec.placeholder)
            begin = [self._token_id(spec.begin)] if spec.begin else []
            end = [self._token_id(spec.end)] if spec.end else []
            self._placeholder_ids[ph] = modality
            self._expansion[ph] = (begin, end)
            fixed = self.tokens_per_input[modality]
            if fixed is not None and (isinstance(fixed, bool) or int(fixed) != fixed or fixed < 1):
                raise ConfigError(f"tokens per input of {modality!r} must be a positive int or None (variable); "
                                  f"got {fixed!r}")
        self._check_template_tokens()

    @property
    def variable_modalities(self) -> tuple[str, ...]:
        """The modalities whose token count differs per input (``tokens_per_input`` None)."""
        return tuple(m for m, n in self.tokens_per_input.items() if n is None)

    def _token_id(self, token: str) -> int:
        ids = self.tokenizer.convert_tokens_to_ids([token])
        if not ids or ids[0] is None or ids[0] == self.tokenizer.unk_token_id:
            raise ConfigError(f"marker {token!r} is not a token of the tokenizer; add the markers first")
        return ids[0]

    def _check_template_tokens(self) -> None:
        """A library template's end-of-turn marker must be one token of this vocabulary: a marker
        spelled out in pieces is a format the model was never trained on."""
        eot = self.chat.end_of_turn
        if self.chat.name is None or not eot.startswith("<") or eot in ("</s>",):
            return
        ids = self.tokenizer.convert_tokens_to_ids([eot])
        if not ids or ids[0] is None or ids[0] == self.tokenizer.unk_token_id:
            raise ConfigError(f"template {self.chat.name!r} ends turns with {eot!r}, which is not a token of this "
                              "tokenizer; choose the template of this model family (mmkit data inspect shows it)")

    # -- rendering ---------------------------------------------------------------------------
    @staticmethod
    def messages(turns: Sequence[Turn], system: str | None) -> list[dict[str, str]]:
        # Outer whitespace is no part of a message (templates differ in trimming it; removing it
        # here makes every template see the same text).
        msgs = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
        msgs += [{"role": t.role, "content": t.text.strip()} for t in turns]
        return msgs

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool, *, spans: bool = False
                ) -> tuple[str, list[tuple[int, int]]]:
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template

        kwargs = {**self.tokenizer.special_tokens_map,
                  # for the plain template (placeholders only); Qwen3's template: no thinking block to
                  # generate, the same empty one its training rendering holds
                  "placeholders": [spec.placeholder for spec in self.markers.values()], "enable_thinking": False}
        try:
            # a template that writes today's date (Llama-3.2's "Today Date") renders one fixed date,
            # its own fallback: training and inference on other days see the same text
            rendered, indices = render_jinja_template(
                conversations=[messages], chat_template=fixed_date_prelude() + self.template,
                add_generation_prompt=add_generation_prompt,
                return_assistant_tokens_mask=spans, **kwargs)
        except (TemplateError, TypeError) as exc:  # TypeError: the template called what is not callable
            raise ConfigError(f"the chat template ({self.describe_template()}) failed to render: {exc}") from None
        return rendered[0], [tuple(s) for s in (indices[0] if indices else [])]

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self._render(messages, add_generation_prompt)[0]

    def describe_template(self) -> str:
        return f"template {self.chat.name!r}" if self.chat.name else "the tokenizer's own template"

    def _assistant_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]], bool]:
        """The full text, the character spans that carry loss, and whether those spans already
        include the end-of-turn marker (generation tags) or must be extended to it."""
        n_assistant = sum(m["role"] == ASSISTANT for m in messages)
        if self.chat.has_generation_tags:
            text, spans = self._render(messages, False, spans=True)
            if len(spans) != n_assistant:
                raise ConfigError(f"the {self.describe_template()} marks {len(spans)} generation block(s) for "
                                  f"{n_assistant} assistant turn(s)")
            at = [i for i, m in enumerate(messages) if m["role"] == ASSISTANT]
            return text, [self._from_prompt(messages, i, text, span) for i, span in zip(at, spans, strict=True)], True
        text = self.render(messages, False)
        marked = [{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)]
        skeleton = self.render(marked, False)
        spans = []
        rebuilt, cursor = [], 0
        for i, message in enumerate(messages):
            mark = _MARK.format(i)
            at = skeleton.find(mark, cursor)
            if at < 0:
                if message["role"] == ASSISTANT:
                    raise ConfigError(f"the {self.describe_template()} does not render assistant turn {i}'s text; "
                                      "choose a library template with --template")
                continue
            rebuilt.append(skeleton[cursor:at])
            start = sum(len(part) for part in rebuilt)
            rebuilt.append(message["content"])
            if message["role"] == ASSISTANT:
                spans.append((i, (start, start + len(message["content"]))))
            cursor = at + len(mark)
        rebuilt.append(skeleton[cursor:])
        if "".join(rebuilt) != text:
            raise ConfigError(f"the {self.describe_template()} changes message text as it renders it, so the answers "
                              "cannot be located; choose a library template with --template NAME")
        return text, [self._from_prompt(messages, i, text, span) for i, span in spans], False

    def _from_prompt(self, messages: list[dict[str, str]], i: int, text: str,
                     span: tuple[int, int]) -> tuple[int, int]:
        """Assistant message ``i``'s supervised span, starting where its inference prompt ends.

        Generation starts right after the prompt (``messages[:i]`` with the generation prompt), so
        whatever the full rendering holds between that point and the answer text (the space of
        ``ASSISTANT: 3``, which Llama-2's vocabulary tokenises as a lone ``▁``) is generated and must
        be learned, and nothing before it may be. Where the prompt is not a prefix of the rendering
        (Qwen3 renders earlier turns without the thinking block its prompt opens) the located span
        is kept."""
        try:
            prompt = self.render(messages[:i], add_generation_prompt=True)
        except ConfigError:  # a template that cannot render this prefix: the located span
            return span
        start, end = span
        if text.startswith(prompt) and len(prompt) < end:
            return len(prompt), end
        return span

    # -- tokenisation ------------------------------------------------------------------------
    @cached_property
    def _special_ids(self) -> frozenset[int]:
        """Tokens that can end a turn: the tokenizer's special tokens, not mmkit's markers, BOS or <unk>."""
        tok = self.tokenizer
        ids = set(tok.all_special_ids)
        ids |= {i for i, added in getattr(tok, "added_tokens_decoder", {}).items() if getattr(added, "special", False)}
        markers = {t for spec in self.markers.values() for t in spec.special_tokens()}
        ids -= {tok.convert_tokens_to_ids(t) for t in markers}
        ids -= {tok.bos_token_id, tok.unk_token_id}
        return frozenset(i for i in ids if i is not None)

    @cached_property
    def _adds_bos(self) -> bool:
        """Whether this tokenizer's model expects a BOS token (its tokenizer adds one by default)."""
        bos = self.tokenizer.bos_token_id
        if bos is None:
            return False
        return self.tokenizer("a")["input_ids"][:1] == [bos]

    def _labels(self, ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
                closed: bool, text_len: int) -> tuple[list[int], bool]:
        """Labels by token position; ``closed``: the spans include the end-of-turn marker. Returns the
        labels and whether every turn ended with a special end-of-turn token."""
        labels = [IGNORE_INDEX] * len(ids)
        all_closed = True
        t = 0
        for k, (start, end) in enumerate(spans):
            while t < len(ids) and offsets[t][1] <= start:
                t += 1
            while t < len(ids) and offsets[t][0] < end:
                if offsets[t][1] > start:  # overlaps the span
                    labels[t] = ids[t]
                t += 1
            if closed:
                continue
            # extend through the end-of-turn token: the first special token before the next span
            limit = spans[k + 1][0] if k + 1 < len(spans) else text_len
            j = t
            while j < len(ids) and offsets[j][0] < limit and ids[j] not in self._special_ids:
                j += 1
            if j < len(ids) and offsets[j][0] < limit:
                for u in range(t, j + 1):
                    labels[u] = ids[u]
                t = j + 1
            else:
                all_closed = False
        return labels, all_closed

    def _encode(self, sample: Sample, text: str, spans: list[tuple[int, int]], closed: bool,
                ids: list[int], offsets: list[tuple[int, int]], input_tokens: InputTokens | None) -> EncodedSample:
        labels, all_closed = self._labels(ids, [tuple(o) for o in offsets], spans, closed, len(text))
        if not closed and not all_closed and self.tokenizer.eos_token_id is not None:
            # A template without an end-of-turn token: teach the model to stop with EOS right after
            # the answer's last token. The template's separator after it ("\n") is never learned, so
            # an EOS after that separator follows a step generation is never taught to take: the
            # model would never stop. Generation produces the answer's tokens, then EOS, and stops.
            end = max((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), default=len(labels) - 1) + 1
            ids, labels = ids[:end], labels[:end]
            ids.append(self.tokenizer.eos_token_id)
            labels.append(self.tokenizer.eos_token_id)
        ids, labels = self._bos_once(ids, labels)
        last = max((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), default=-1)
        if last < 0:
            raise DataError(sample.source, sample.index, "no assistant tokens to learn from", record_id=sample.id,
                            kind="schema")
        ids, labels = ids[: last + 1], labels[: last + 1]
        input_ids, labels, counts, slots = self._expand(ids, labels, input_tokens, sample)
        self._check(sample, counts, len(input_ids), slots)
        return EncodedSample(input_ids, labels, counts, slots)

    def _bos_once(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        bos = self.tokenizer.bos_token_id
        if bos is None:
            return ids, labels
        while len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids, labels = ids[1:], labels[1:]
        if self._adds_bos and (not ids or ids[0] != bos):
            ids, labels = [bos, *ids], [IGNORE_INDEX, *labels]
        return ids, labels

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def _expand(self, ids: Sequence[int], labels: Sequence[int], input_tokens: InputTokens | None,
                sample: Sample | None) -> tuple[list[int], list[int], dict[str, int], dict[str, tuple[int, ...]]]:
        out_ids: list[int] = []
        out_labels: list[int] = []
        counts: dict[str, int] = {}
        slots: dict[str, list[int]] = {}
        for tok, lab in zip(ids, labels, strict=True):
            modality = self._placeholder_ids.get(tok)
            if modality is None:
                out_ids.append(tok)
                out_labels.append(lab)
                continue
            k = counts.get(modality, 0)
            n = self._slots(modality, k, input_tokens, sample)
            begin, end = self._expansion[tok]
            out_ids.extend(begin + [tok] * n + end)
            out_labels.extend([IGNORE_INDEX] * (len(begin) + n + len(end)))
            counts[modality] = k + 1
            slots.setdefault(modality, []).append(n)
        if input_tokens is not None:
            for modality, given in input_tokens.items():
                if modality in self.tokens_per_input and len(given) != counts.get(modality, 0):
                    self._mismatch(sample, modality, len(given), counts.get(modality, 0))
        return out_ids, out_labels, counts, {m: tuple(v) for m, v in slots.items()}

    def _slots(self, modality: str, k: int, input_tokens: InputTokens | None, sample: Sample | None) -> int:
        """The slots of input ``k`` (placeholder order) of ``modality``."""
        fixed = self.tokens_per_input[modality]
        given = None if input_tokens is None else input_tokens.get(modality)
        if given is None:
            if fixed is not None:
                return int(fixed)
            if sample is not None and not sample.inputs.get(modality):
                self._mismatch(sample, modality, 0, k + 1)
            raise ConfigError(f"{modality!r} has a variable token count per input: encoding "
                              f"{'record ' + repr(sample.id) if sample is not None else 'a prompt'} needs input_tokens "
                              f"(each {modality} input's count, from the encoder's num_tokens_for)")
        if k >= len(given):
            self._mismatch(sample, modality, len(given), k + 1)
        n = int(given[k])
        if n < 0 or (fixed is not None and n != fixed):
            raise ConfigError(f"{modality!r} input {k}: {n} tokens given, but the modality has "
                              f"{'a fixed ' + str(fixed) if fixed is not None else 'no negative counts'} tokens per input")
        return n

    @staticmethod
    def _mismatch(sample: Sample | None, modality: str, inputs: int, placeholders: int) -> None:
        reason = f"{inputs} {modality} input(s) but {'at least ' if placeholders > inputs else ''}{placeholders} " \
                 "placeholder token(s) after tokenisation"
        if sample is None:
            raise ConfigError(f"the prompt has {reason}")
        raise DataError(sample.source, sample.index, reason, record_id=sample.id, kind="placeholder")

    # -- the entry points --------------------------------------------------------------------
    def encode_sample(self, sample: Sample, input_tokens: InputTokens | None = None) -> EncodedSample:
        """Training: the whole conversation; loss on each answer and its end-of-turn token only.

        ``input_tokens``: per modality, each input's slot count in placeholder order (required for a
        modality whose ``tokens_per_input`` is ``None``; others default to their fixed count)."""
        out = self.encode_samples([sample], [input_tokens])[0]
        if isinstance(out, DataError):
            raise out
        return out

    def encode_samples(self, samples: Sequence[Sample],
                       input_tokens: Sequence[InputTokens | None] | None = None) -> list[EncodedSample | DataError]:
        """:meth:`encode_sample` for many samples with one batched tokenizer call; a sample's
        problem is returned in its place (validation reports all of them). ``input_tokens``: one
        entry per sample (see :meth:`encode_sample`)."""
        if input_tokens is not None and len(input_tokens) != len(samples):
            raise ValueError(f"encode_samples: {len(input_tokens)} input_tokens entries for {len(samples)} samples")
        rendered = []
        for sample in samples:
            rendered.append(self._assistant_spans(self.messages(sample.turns, sample.system)))
        texts = [text for text, _, _ in rendered]
        if not texts:
            return []
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        out: list[EncodedSample | DataError] = []
        for k, (sample, (text, spans, closed)) in enumerate(zip(samples, rendered, strict=True)):
            try:
                out.append(self._encode(sample, text, spans, closed, list(enc["input_ids"][k]),
                                        list(enc["offset_mapping"][k]), input_tokens[k] if input_tokens else None))
            except DataError as exc:
                out.append(exc)
        return out

    def encode_prompt(self, turns: Sequence[Turn], system: str | None = None,
                      input_tokens: InputTokens | None = None) -> EncodedSample:
        """Inference: the conversation so far, ending with the generation prompt. ``input_tokens``:
        as for :meth:`encode_sample`."""
        ids, _ = self._tokenize(self.prompt_text(turns, system))
        ids, labels = self._bos_once(ids, [IGNORE_INDEX] * len(ids))
        input_ids, labels, counts, slots = self._expand(ids, labels, input_tokens, None)
        return EncodedSample(input_ids, labels, counts, slots)

    def prompt_text(self, turns: Sequence[Turn], system: str | None = None) -> str:
        """The inference prompt as text (what ``mmkit data inspect`` shows)."""
        return self.render(self.messages(turns, system), add_generation_prompt=True)

    @cached_property
    def stop_token_ids(self) -> frozenset[int]:
        """EOS and the template's end-of-turn token: the last learned token of a probe answer when
        it is a special token."""
        tok = self.tokenizer
        stops = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        eot = self.chat.end_of_turn
        if eot:
            ids = tok.convert_tokens_to_ids([eot])
            if ids and ids[0] is not None and ids[0] != tok.unk_token_id:
                stops.add(ids[0])
        probe = Sample(id="probe", turns=(Turn("user", "x"), Turn(ASSISTANT, "y")))
        try:
            enc = self.encode_sample(probe)
        except (DataError, ConfigError):
            return frozenset(stops)
        learned = [lab for lab in enc.labels if lab != IGNORE_INDEX]
        if learned and learned[-1] in self._special_ids:
            stops.add(learned[-1])
        return frozenset(stops)

    def _check(self, sample: Sample, counts: Mapping[str, int], length: int,
               slots: Mapping[str, Sequence[int]]) -> None:
        for modality, paths in sample.inputs.items():
            if counts.get(modality, 0) != len(paths):
                raise DataError(sample.source, sample.index,
                                f"{len(paths)} {modality} input(s) but {counts.get(modality, 0)} placeholder token(s) "
                                "after tokenisation", record_id=sample.id, kind="placeholder")
        problem = self.length_problem(length, slots)
        if problem is not None:
            raise DataError(sample.source, sample.index, problem, record_id=sample.id, kind="too_long")

    def length_problem(self, length: int, slots: Mapping[str, Sequence[int]]) -> str | None:
        """The length rule (training, validation and packing all apply this one): ``length`` tokens,
        modality slots included (``slots``: each input's count per modality), within ``max_length``.
        The reason it fails, or ``None``."""
        if self.max_length is None or length <= self.max_length:
            return None
        parts = []
        for modality, per_input in slots.items():
            if len(set(per_input)) == 1:
                parts.append(f"{len(per_input)} {modality} x {per_input[0]}")
            else:
                parts.append(f"{modality} {'+'.join(str(n) for n in per_input)}")
        detail = ", ".join(parts)
        return (f"{length} tokens including modality tokens{f' ({detail})' if detail else ''}, "
                f"over the maximum {self.max_length}")

    def lengths(self, samples: Sequence[Sample], input_tokens: Sequence[InputTokens | None] | None = None
                ) -> list[tuple[int, dict[str, int]]]:
        """``(length, inputs per modality)`` per sample, as :meth:`encode_sample` counts them (one
        batched tokenizer call); a sample that does not encode raises its :class:`DataError`."""
        out = []
        for result in self.encode_samples(samples, input_tokens):
            if isinstance(result, DataError):
                raise result
            out.append((len(result.input_ids), dict(result.input_counts)))
        return out

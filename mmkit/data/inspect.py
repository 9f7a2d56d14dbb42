"""``mmkit data inspect``: what training will feed the model, record by record.

For each record: the exact token sequence training uses (:meth:`PromptBuilder.encode_sample`), the
spans that carry loss decoded back to text, the slots each modality input receives, and the
inference prompt (the conversation before its last answer, ending with the generation prompt).
Check a new model / template pair with it before spending GPU hours.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import attrs

from mmkit.records import ASSISTANT, ReadContext, Sample
from mmkit.errors import DataError, InputError
from mmkit.prompt import IGNORE_INDEX, EncodedSample, PromptBuilder


@attrs.frozen
class Segment:
    """A run of tokens shown together: plain text, supervised text, or a run of modality slots."""

    kind: str  # "text", "supervised" or "slots"
    text: str
    count: int = 0  # slots in the run


def supervised_runs(encoded: EncodedSample) -> list[list[int]]:
    """The contiguous runs of tokens that carry loss."""
    runs: list[list[int]] = []
    current: list[int] = []
    for lab in encoded.labels:
        if lab == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(lab)
    if current:
        runs.append(current)
    return runs


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def segments(prompts: PromptBuilder, encoded: EncodedSample) -> list[Segment]:
    """The sequence split into text, supervised text and collapsed slot runs. Text is decoded as a
    prefix of the whole sequence (so a piece keeps the space a word-initial token carries)."""
    tok = prompts.tokenizer
    slot_ids = {tok.convert_tokens_to_ids(spec.placeholder): spec.placeholder for spec in prompts.markers.values()}
    ids = list(encoded.input_ids)
    kinds = ["slots" if tid in slot_ids else "supervised" if lab != IGNORE_INDEX else "text"
             for tid, lab in zip(ids, encoded.labels, strict=True)]
    bounds = [0] + [i for i in range(1, len(ids)) if kinds[i] != kinds[i - 1] or ids[i] != ids[i - 1]
                    and kinds[i] == "slots"] + [len(ids)]
    out: list[Segment] = []
    decoded_upto = {0: ""}

    def upto(i: int) -> str:
        if i not in decoded_upto:
            decoded_upto[i] = _decode(tok, ids[:i])
        return decoded_upto[i]

    for start, end in zip(bounds, bounds[1:]):
        kind = kinds[start]
        if kind == "slots":
            out.append(Segment("slots", slot_ids[ids[start]], end - start))
            continue
        before, after = upto(start), upto(end)
        text = after[len(before):] if after.startswith(before) else _decode(tok, ids[start:end])
        out.append(Segment(kind, text))
    return out


def slots_per_input(prompts: PromptBuilder, encoded: EncodedSample) -> dict[str, list[int]]:
    """Per modality, the slots each input got (its run of placeholder tokens), in order."""
    if encoded.input_tokens:  # what the builder reserved per input (variable counts included)
        return {m: list(counts) for m, counts in encoded.input_tokens.items()}
    names = {prompts.tokenizer.convert_tokens_to_ids(spec.placeholder): m for m, spec in prompts.markers.items()}
    out: dict[str, list[int]] = {}
    previous = None
    for tid in encoded.input_ids:
        modality = names.get(tid)
        if modality is None:
            previous = None
            continue
        if previous != tid:
            out.setdefault(modality, []).append(0)
        out[modality][-1] += 1
        previous = tid
    # adjacent inputs of one modality are separated by their begin/end markers; without markers
    # two inputs' runs would merge: split by the known count per input
    for modality, runs in out.items():
        per = prompts.tokens_per_input.get(modality)
        if per and any(r > per for r in runs):
            out[modality] = [per] * (sum(runs) // per)
    return out


def inference_turns(sample: Sample) -> tuple:
    """The conversation up to (not including) its last answer."""
    turns = list(sample.turns)
    while turns and turns[-1].role == ASSISTANT:
        turns.pop()
    return tuple(turns)


def inspect_record(prompts: PromptBuilder, sample: Sample, counter: Any = None) -> dict[str, Any]:
    """The ``--json`` entry for one record (``error`` instead of the encoding when it does not encode).

    Inputs of a variable-size modality are counted by preprocessing them (``counter``: ``sample ->
    input_tokens``, default :class:`~mmkit.data.validate.InputTokenCounter` over the installed plugins'
    tiny encoders; ``InputTokenCounter(modalities, choices=encoder_choices(...))`` counts with a run's
    encoders, as ``mmkit data inspect --config`` / ``--set`` does)."""
    base: dict[str, Any] = {"id": sample.id, "file": sample.source, "record": sample.index}
    input_tokens = None
    try:
        if prompts.variable_modalities:
            if counter is None:
                from mmkit.data.validate import InputTokenCounter

                counter = InputTokenCounter(prompts.variable_modalities)
            input_tokens = counter(sample)
        encoded = prompts.encode_sample(sample, input_tokens)
    except DataError as exc:
        return {**base, "error": exc.reason, "kind": exc.kind}
    except InputError as exc:
        return {**base, "error": str(exc), "kind": "corrupt_file"}
    turns = inference_turns(sample)
    # the prompt holds the inputs of the turns before the last answer: the first ones in placeholder order
    prompt = prompts.encode_prompt(turns, sample.system, _leading(input_tokens, prompts, turns, sample.system))
    runs = supervised_runs(encoded)
    return {
        **base,
        "input_ids": list(encoded.input_ids),
        "labels": list(encoded.labels),
        "supervised_text": [_decode(prompts.tokenizer, run) for run in runs],
        "slots": slots_per_input(prompts, encoded),
        "tokens": len(encoded.input_ids),
        "supervised_tokens": sum(len(run) for run in runs),
        "prompt": prompts.prompt_text(turns, sample.system),
        "prompt_tokens": len(prompt.input_ids),
        "_encoded": encoded,
    }


def _leading(input_tokens: Any, prompts: PromptBuilder, turns: Sequence[Any], system: str | None
             ) -> dict[str, list[int]] | None:
    """``input_tokens`` cut to the placeholders the ``turns`` (and the system prompt) hold."""
    if not input_tokens:
        return None
    out = {}
    for modality, counts in input_tokens.items():
        placeholder = prompts.markers[modality].placeholder
        held = sum(turn.text.count(placeholder) for turn in turns) + (system or "").count(placeholder)
        out[modality] = list(counts)[:held]
    return out


def iter_records(host: Any, files: Sequence[str | Path], modalities: Sequence[str], *, data_root: str | None = None,
                 allow_outside_root: bool = False, data_format: str | None = None,
                 limit: int | None = None) -> Iterator[Sample]:
    """Samples of ``files`` in order, at most ``limit`` in all; malformed records raise (their
    reason is the point of inspecting)."""
    from mmkit.data.sources import pick_reader
    from mmkit.specs import resolve

    specs = {m: host.modality(m) for m in modalities}
    ctx = ReadContext(modalities=specs, data_root=Path(data_root) if data_root else None,
                      allow_outside_root=allow_outside_root)

    def all_samples() -> Iterator[Sample]:
        for file in files:
            reader = pick_reader(host, Path(file), data_format)
            yield from resolve(host.reader(reader).read)(Path(file), context=ctx)

    return islice(all_samples(), limit)

"""The normalised sample every reader produces, and the parsing rules they share.

Generic record format (JSON list or JSONL; LLaVA and LAMM records are special cases)::

    {"id": "42", "image": "digits/0042.png",            # any registered modality's data key,
     "system": "optional system message",               #   a path or a list of paths
     "conversations": [{"from": "human", "value": "<image>\\nWhat digit is shown?"},
                       {"from": "gpt", "value": "7"}]}

Turn roles may be written ``human``/``gpt`` (LLaVA, ShareGPT) or ``user``/``assistant`` with
``content`` (``messages``: TRL, Hugging Face chat, ms-swift). A leading ``system`` turn becomes the
system message (a record gives it once: a ``system`` key or a system turn). ``content`` may be a list of parts (``{"type": "text", "text": ...}`` and one part per
modality input, ``{"type": KEY}`` with KEY a data key of an installed modality, optionally holding
the path itself); each modality part puts that modality's placeholder where it stands. A data key
may also be written in the plural (the key plus ``s``, a list of paths: ms-swift and TRL style).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from mmkit.errors import DataError
from mmkit.specs import MarkerSpec, ModalitySpec

USER, ASSISTANT = "user", "assistant"
SYSTEM = "system"
_ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "model": ASSISTANT,
          "bot": ASSISTANT, "chatgpt": ASSISTANT, "system": SYSTEM}
#: Fields of the formats mmkit reads that carry nothing for training: LLaVA-1.5's ShareGPT records
#: (``model``), LAMM's provenance fields, TRL's ``tools`` and ms-swift's ``objects``.
KNOWN_KEYS = {"id", "conversations", "messages", "system", "task_type", "src_image", "src_dataset",
              "src_id", "label", "answers", "meta", "model", "tools", "objects"}


@attrs.frozen
class Turn:
    role: str
    text: str


@attrs.frozen
class Sample:
    """One conversation with its modality inputs, in order of their placeholders."""

    id: str
    turns: tuple[Turn, ...]
    inputs: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    system: str | None = None
    source: str = ""
    index: int = 0
    meta: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities present, in order of first placeholder."""
        return tuple(name for name, paths in self.inputs.items() if paths)

    @property
    def where(self) -> str:
        return f"{self.source} record {self.index} (id {self.id})"


@attrs.frozen
class ReadContext:
    """What a reader needs besides the file: the registered modalities and path rules."""

    modalities: Mapping[str, ModalitySpec]
    data_root: Path | None = None
    allow_outside_root: bool = False
    check_files: bool = False
    #: ``--skip-bad-records``: readers pass each malformed record's :class:`DataError` here and go on
    #: with the next record instead of raising it (``None``: raise).
    on_bad_record: Callable[[DataError], None] | None = None

    def modality_for_key(self, key: str) -> ModalitySpec | None:
        """The modality a record key (or a content part's ``type``) names: one of its data keys, or
        a data key's plural (the key plus ``s``)."""
        for spec in self.modalities.values():
            if key in spec.data_keys:
                return spec
        for spec in self.modalities.values():
            if key.endswith("s") and key[:-1] in spec.data_keys:
                return spec
        return None


def canonical_placeholders(text: str, markers: Iterable[MarkerSpec]) -> str:
    """``text`` with every placeholder alias (LAMM's ``<pcl>``) written as its modality's placeholder:
    what the readers do to training data and inference to a question, so both prompt alike."""
    for marker in markers:
        for alias in marker.aliases:
            text = text.replace(alias, marker.placeholder)
    return text


def placeholder_order(names: Iterable[str], turns: Sequence[Turn], markers: Mapping[str, MarkerSpec]) -> list[str]:
    """The modalities ``names`` ordered by where each one's placeholder first appears in ``turns``
    (one without a placeholder last): the order of :attr:`Sample.inputs`, whose first modality picks
    the sample's LoRA adapter in training and generation alike."""
    text = "\n".join(t.text for t in turns)

    def first(name: str) -> int:
        at = text.find(markers[name].placeholder)
        return at if at >= 0 else len(text) + 1

    return sorted(names, key=first)


@functools.lru_cache(maxsize=64)
def _absolute(root: str, cwd: str) -> str:
    return os.path.realpath(os.path.join(cwd, root))


def resolve_path(raw: Any, *, ctx: ReadContext, base: Path, source: str, index: int) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise DataError(source, index, f"input path must be a non-empty string, got {raw!r}", kind="schema")
    root = ctx.data_root or base
    path = Path(raw)
    full = path if path.is_absolute() else root / path
    if not ctx.allow_outside_root:
        # strings, not Path.parents: this runs once per input of every record. Symbolic links are
        # resolved first: a link inside the root may point anywhere.
        resolved = os.path.realpath(full)
        root_abs = _absolute(str(root), os.getcwd())
        if resolved != root_abs and not resolved.startswith(root_abs.rstrip(os.sep) + os.sep):
            via = f" through a symbolic link, to {resolved}" if os.path.islink(full) or os.path.normpath(
                os.path.abspath(full)).startswith(root_abs.rstrip(os.sep) + os.sep) else ""
            raise DataError(source, index, f"path {raw!r} escapes the data root {root}{via} "
                                           "(pass --allow-outside-root to permit it)", kind="path")
    # A folder can be one input (a plugin whose loader reads a directory, e.g. numbered frames).
    if ctx.check_files and not (full.is_file() or full.is_dir()):
        raise DataError(source, index, f"file not found: {full}", kind="missing_file")
    return str(full)


def parse_record(obj: Any, *, ctx: ReadContext, base: Path, source: str, index: int,
                 system: str | None = None, allowed_keys: set[str] | None = None,
                 implicit_placeholders: bool = False, require_input: bool = False) -> Sample:
    """Validate one raw record and normalise it. Raises :class:`DataError` naming the record (file,
    index and, when the record has one, its id) with a ``kind`` for reports.

    ``implicit_placeholders``: a modality whose inputs have no placeholder anywhere in the text gets
    them at the start of the first user turn (where LAMM's loader puts the vision tokens).
    ``require_input``: a record without any modality input is refused (a format with no text-only
    records, such as LAMM's, whose model encodes an input for every sample)."""
    try:
        return _parse_record(obj, ctx=ctx, base=base, source=source, index=index, system=system,
                             allowed_keys=allowed_keys, implicit_placeholders=implicit_placeholders,
                             require_input=require_input)
    except DataError as exc:
        if exc.record_id is None and isinstance(obj, dict) and "id" in obj:
            raise DataError(exc.source, exc.record, exc.reason, record_id=str(obj["id"]), kind=exc.kind) from None
        raise


def _parse_record(obj: Any, *, ctx: ReadContext, base: Path, source: str, index: int, system: str | None,
                  allowed_keys: set[str] | None, implicit_placeholders: bool = False,
                  require_input: bool = False) -> Sample:
    if not isinstance(obj, dict):
        raise DataError(source, index, f"record must be a JSON object, got {type(obj).__name__}", kind="schema")
    conv = obj.get("conversations", obj.get("messages"))
    if conv is None:
        raise DataError(source, index, "no 'conversations' (or 'messages')", kind="schema")
    if not isinstance(conv, list) or not conv:
        raise DataError(source, index, "'conversations' must be a non-empty list", kind="schema")
    part_inputs: dict[str, list[str]] = {}  # paths given inside content parts
    turns, turn_system = _read_turns(conv, ctx=ctx, source=source, index=index, part_inputs=part_inputs)
    inputs, unknown = _record_inputs(obj, part_inputs, ctx=ctx, base=base, source=source, index=index,
                                     allowed_keys=allowed_keys)
    if require_input and not inputs:
        keys = ", ".join(repr(k) for spec in ctx.modalities.values() for k in spec.data_keys)
        raise DataError(source, index, f"no modality input: every record of this format has one (expected one of "
                                       f"the keys {keys}); it is not trained as a text-only sample", kind="schema")
    # Rewrite placeholder aliases (LAMM's <pcl>), then check counts per modality.
    markers = {name: spec.markers for name, spec in ctx.modalities.items()}
    turns = [Turn(t.role, canonical_placeholders(t.text, markers.values())) for t in turns]
    for spec in ctx.modalities.values():
        turns = _placeholders(spec, turns, len(inputs.get(spec.name, ())), source=source, index=index,
                              implicit=implicit_placeholders)
    order = placeholder_order(inputs, turns, markers)
    record_system = _system(obj, turn_system, system, source=source, index=index)
    if record_system is not None and not isinstance(record_system, str):
        raise DataError(source, index, "'system' must be a string", kind="schema")
    meta = {k: obj[k] for k in ("task_type", "label", "answers", "src_dataset") if k in obj}
    if unknown:
        meta["unknown_keys"] = tuple(sorted(unknown))
    return Sample(
        id=str(obj.get("id", index)),
        turns=tuple(turns),
        inputs={m: inputs[m] for m in order},
        system=record_system,
        source=source,
        index=index,
        meta=meta,
    )


def _system(obj: dict[str, Any], turn_system: str | None, default: str | None, *, source: str,
            index: int) -> Any:
    """The record's system message: its ``system`` key or its leading system turn (never both: no
    published layout mmkit reads combines them, and keeping one would silently drop the other), else
    the reader's ``default``. A ``system`` key of ``null`` means none."""
    if turn_system is None:
        return obj.get("system", default)
    if obj.get("system") is not None:
        raise DataError(source, index, "system message given twice: a 'system' key and a leading system turn",
                        kind="schema")
    return turn_system


def _read_turns(conv: list[Any], *, ctx: ReadContext, source: str, index: int,
                part_inputs: dict[str, list[str]]) -> tuple[list[Turn], str | None]:
    """The user/assistant turns, alternating from the user's and ending with the assistant's, and the
    leading system turn's text (``None`` without one); paths in content parts go to ``part_inputs``."""
    turns: list[Turn] = []
    turn_system = None
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise DataError(source, index, f"turn {t} is not an object", kind="schema")
        speaker = turn.get("from", turn.get("role", ""))
        role = _ROLES.get(str(speaker).lower())
        if role is None:
            raise DataError(source, index, f"turn {t} has unknown speaker {speaker!r}", kind="schema")
        text = turn.get("value", turn.get("content"))
        if isinstance(text, list):
            text = _join_parts(text, ctx=ctx, t=t, source=source, index=index, inputs=part_inputs)
        if role == SYSTEM:
            if turns or turn_system is not None:
                raise DataError(source, index, f"turn {t}: a system turn must come first", kind="turn_order")
            if not isinstance(text, str):
                raise DataError(source, index, f"turn {t}: the system message must be text", kind="schema")
            turn_system = text
            continue
        turns.append(_dialogue_turn(role, text, len(turns), t=t, source=source, index=index))
    if not turns:
        raise DataError(source, index, "no user or assistant turns", kind="turn_order")
    if turns[-1].role != ASSISTANT:
        raise DataError(source, index, "the last turn must be the assistant's answer", kind="turn_order")
    return turns, turn_system


def _dialogue_turn(role: str, text: Any, before: int, *, t: int, source: str, index: int) -> Turn:
    """Turn ``t``, a user or assistant turn after ``before`` others: non-empty text, in its place."""
    if text is not None and not isinstance(text, str):
        raise DataError(source, index, f"turn {t}: the value must be text, got {type(text).__name__} "
                                       f"{json.dumps(text)[:40]}", kind="schema")
    if not isinstance(text, str) or not text.strip():
        raise DataError(source, index, f"turn {t} is empty", kind="empty_turn")
    expected = USER if before % 2 == 0 else ASSISTANT
    if role != expected:
        raise DataError(source, index, f"turn {t} is from {role}, expected {expected} "
                                       "(turns alternate, starting with the user)", kind="turn_order")
    return Turn(role, text)


def _record_inputs(obj: dict[str, Any], part_inputs: Mapping[str, list[str]], *, ctx: ReadContext, base: Path,
                   source: str, index: int, allowed_keys: set[str] | None
                   ) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """Each modality's resolved input paths (from its data key, or from content parts) and the record's
    keys that are neither known fields nor allowed data keys."""
    inputs: dict[str, tuple[str, ...]] = {}
    unknown = []
    for key, value in obj.items():
        if key in KNOWN_KEYS:
            continue
        spec = ctx.modality_for_key(key)
        if spec is None or (allowed_keys is not None and key not in allowed_keys):
            unknown.append(key)
            continue
        values = value if isinstance(value, list) else [value]
        paths = tuple(resolve_path(v, ctx=ctx, base=base, source=source, index=index) for v in values)
        if spec.name in inputs:
            raise DataError(source, index, f"modality {spec.name!r} given under two keys", kind="schema")
        if paths:
            inputs[spec.name] = paths
    for name, raw_paths in part_inputs.items():
        if name in inputs:
            raise DataError(source, index, f"{name} paths given both in content parts and as a record key",
                            kind="schema")
        inputs[name] = tuple(resolve_path(v, ctx=ctx, base=base, source=source, index=index) for v in raw_paths)
    return inputs, unknown


def _placeholders(spec: ModalitySpec, turns: list[Turn], given: int, *, source: str, index: int,
                  implicit: bool) -> list[Turn]:
    """``turns`` (aliases already rewritten) with, ``implicit``, the modality's missing placeholders
    put first; raises unless there is one placeholder per input, none in an answer."""
    count = sum(t.text.count(spec.markers.placeholder) for t in turns)
    if implicit and given and not count:
        # LAMM's layout: no placeholder in the text; the inputs go before the first user turn's text
        first = turns[0]
        turns[0] = Turn(first.role, "".join(spec.markers.placeholder + "\n" for _ in range(given)) + first.text)
        count = given
    for t in turns:
        if t.role == ASSISTANT and spec.markers.placeholder in t.text:
            raise DataError(source, index, f"placeholder {spec.markers.placeholder} in an assistant turn",
                            kind="placeholder")
    if count != given:
        if given and not count:
            reason = f"{given} {spec.name} input(s) but no {spec.markers.placeholder} placeholder"
        elif count and not given:
            reason = f"{count} {spec.markers.placeholder} placeholder(s) but no {spec.name} input"
        else:
            reason = f"{count} {spec.markers.placeholder} placeholder(s) for {given} {spec.name} input(s)"
        raise DataError(source, index, reason, kind="placeholder")
    return turns


def _join_parts(parts: list[Any], *, ctx: ReadContext, t: int, source: str, index: int,
                inputs: dict[str, list[str]]) -> str:
    """Content parts to text: text parts joined, each modality part replaced by its placeholder
    (and its path, when the part holds one, collected in ``inputs``)."""
    out = []
    for p, part in enumerate(parts):
        if isinstance(part, str):
            out.append(part)
            continue
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise DataError(source, index, f"turn {t} part {p}: expected an object with a 'type'", kind="schema")
        kind = part["type"]
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise DataError(source, index, f"turn {t} part {p}: a text part needs 'text'", kind="schema")
            out.append(part["text"])
            continue
        spec = ctx.modality_for_key(kind)
        if spec is None:
            raise DataError(source, index, f"turn {t} part {p}: part type {kind!r} is not text nor a data key of an "
                                           f"installed modality", kind="schema")
        path = next((part[k] for k in (kind, "path", "url") if isinstance(part.get(k), str)), None)
        if path is not None:
            inputs.setdefault(spec.name, []).append(path)
        out.append(spec.markers.placeholder)
    return "".join(out)

"""File readers for instruction data: generic, LLaVA and LAMM. JSONL streams line by line."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from mmkit.records import ReadContext, Sample, parse_record
from mmkit.errors import DataError

# System messages selected by LAMM's ``task_type`` (paraphrased from the task descriptions of LAMM's
# conversation_dict, one per task family, under LAMM's task names). LAMM's "normal" task uses the
# chat template's own system message, and so does mmkit (no entry here).
LAMM_SYSTEM_MESSAGES = {
    "conversation": "You are a helpful assistant. Hold a conversation about the input with the user.",
    "conversation3d": "You are a helpful assistant. Hold a conversation about the 3D input with the user.",
    "description": "You are a helpful assistant. Describe the input in detail.",
    "detailed_description": "You are a helpful assistant. Describe the input in detail.",
    "description3d": "You are a helpful assistant. Describe the 3D input in detail.",
    "classification": "Identify the main object in the input and answer with its category.",
    "classification3d": "Identify the object in the point cloud and answer with its category.",
    "detection": "Find the objects in the image and give each one's class and normalized box [x1, y1, x2, y2].",
    "detection3d": "Find the objects in the scene and give each one's class and box [cx, cy, cz, l, w, h] in metres.",
    "visual_grounding3d": "Locate the object the user describes and give its box [cx, cy, cz, l, w, h] in metres.",
    "keypoint_detection": "Locate the person's keypoints the user asks for and give each as normalized [x, y].",
    "VQA": "Answer the question about the input; for multiple choice, answer with the option's letter.",
    "VQA3d": "Answer the question about the 3D scene.",
    "VQA3D": "Answer the question about the 3D scene.",
    "commomsenseqa": "Answer the question about the input, using knowledge beyond it where needed.",
    "commomsenseqa3d": "Answer the question about the 3D input, using knowledge beyond it where needed.",
    "counting": "Count the objects the user asks about and answer with a number.",
    "caption": "Describe the input in one sentence.",
}


def iter_raw_records(path: Path, on_bad_line: Callable[[DataError], None] | None = None
                     ) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, object)`` from a JSON list or a JSONL file; JSONL is streamed.

    A JSONL line that is not UTF-8 or not JSON raises :class:`DataError`, or with ``on_bad_line`` is
    passed to it and skipped (it keeps its record index, so later records keep their numbers).
    """
    source = str(path)
    if not path.is_file():
        raise DataError(source, None, "file not found", kind="missing_file")
    first = _first_byte(path, source)
    if first == b"[":
        yield from enumerate(_json_list(path, source))
        return
    if first not in (b"{", b""):
        raise DataError(source, None, "not JSON or JSONL: expected a list '[...]' or one object per line",
                        kind="file_format")
    # Binary lines decoded one at a time: a text-mode reader decodes 8 KiB chunks ahead of the
    # lines it returns, so a bad byte would be blamed on an earlier record.
    with open(path, "rb") as fh:
        index = 0
        lineno = 0
        for raw in fh:
            lineno += 1
            parsed = _jsonl_line(raw, path, source, index=index, lineno=lineno)
            if parsed is _BLANK:
                continue
            if not isinstance(parsed, DataError):
                yield index, parsed
                index += 1
                continue
            if on_bad_line is None:
                raise parsed
            on_bad_line(parsed)
            index += 1


#: :func:`_jsonl_line` of a blank line (any JSON value, ``null`` included, is a record).
_BLANK = object()


def _first_byte(path: Path, source: str) -> bytes:
    """The file's first non-blank byte (after a UTF-8 byte-order mark); raises when its start is not UTF-8."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at 4096 bytes is fine; anything earlier is not UTF-8.
        if exc.start < len(head) - 4:
            raise DataError(source, None, f"not UTF-8 text (byte {exc.start})", kind="encoding") from None
    return head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1]  # a UTF-8 byte-order mark is allowed


def _json_list(path: Path, source: str) -> Any:
    """A JSON file's value, read whole; what keeps it from reading is a :class:`DataError`."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            return json.load(fh)
    except RecursionError:
        raise DataError(source, None, "JSON nested too deeply to read (over ~1000 levels of lists/objects)",
                        kind="file_format") from None
    except UnicodeDecodeError as exc:
        raise DataError(source, None, f"not UTF-8 text (byte {exc.start})", kind="encoding") from None
    except json.JSONDecodeError as exc:
        raise DataError(source, None, f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                        kind="file_format") from None


def _jsonl_line(raw: bytes, path: Path, source: str, *, index: int, lineno: int) -> Any:
    """One JSONL line's value, :data:`_BLANK` for a blank line, or the :class:`DataError` (record
    ``index``) saying why it cannot be read."""
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        return DataError(source, index, f"line {lineno} is not UTF-8 text (byte {exc.start} of the line)",
                         kind="encoding")
    if not line.strip():
        return _BLANK
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        return DataError(source, index, f"line {lineno} is not valid JSON: {exc.msg}"
                         + _whole_file_hint(path, lineno), kind="file_format")
    except RecursionError:
        return DataError(source, index, f"line {lineno}: JSON nested too deeply to read (over ~1000 "
                         "levels of lists/objects)", kind="file_format")


def _whole_file_hint(path: Path, lineno: int) -> str:
    """A pretty-printed single object fails on its first line; say what the file is instead."""
    if lineno != 1 or path.stat().st_size > 64 << 20:
        return ""
    try:
        with open(path, encoding="utf-8") as fh:
            whole = json.load(fh)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return ""
    if isinstance(whole, dict):
        return " (the file is one JSON object; expected a list of records '[...]' or one record per line)"
    return ""


def read_records(path: str | Path, context: ReadContext, *, system_for: Callable[[Any], str | None] | None = None,
                 allowed_keys: set[str] | None = None, implicit_placeholders: bool = False,
                 require_input: bool = False) -> Iterator[Sample]:
    """Stream a JSON list or JSONL file of conversation records as normalised :class:`Sample` s:
    the body of a reader plugin's ``read(path, *, context)`` for any conversation-shaped format.

    Each record is validated (turns, one placeholder per input, paths inside the data root) and a
    bad one raises :class:`~mmkit.errors.DataError` naming the file and record, or goes to
    ``context.on_bad_record``. ``system_for(raw_record)`` picks a system message per record;
    ``allowed_keys`` limits the input keys to these (a format that names its own keys);
    ``implicit_placeholders`` puts a missing placeholder at the start of the first user turn (LAMM);
    ``require_input`` refuses a record without any modality input (a format with no text-only records).
    Records from elsewhere (a database, a dataset library): :func:`parse_records`.
    """
    path = Path(path)
    yield from parse_records(iter_raw_records(path, context.on_bad_record), context, source=str(path),
                             base=path.parent, system_for=system_for, allowed_keys=allowed_keys,
                             implicit_placeholders=implicit_placeholders, require_input=require_input)


def parse_records(records: Iterable[tuple[int, Any]], ctx: ReadContext, *, source: str, base: Path,
                  system_for: Callable[[Any], str | None] | None = None, allowed_keys: set[str] | None = None,
                  **rules: bool) -> Iterator[Sample]:
    """Normalise ``(index, raw record)`` pairs; a bad record raises, or goes to ``ctx.on_bad_record``.
    ``source`` names them in errors; relative input paths start at ``base`` (or the data root)."""
    for index, obj in records:
        system = system_for(obj) if system_for else None
        try:
            sample = parse_record(obj, ctx=ctx, base=base, source=source, index=index, system=system,
                                  allowed_keys=allowed_keys, **rules)
        except DataError as exc:
            if ctx.on_bad_record is None:
                raise
            ctx.on_bad_record(exc)
            continue
        yield sample


def read_generic(path: Path, *, context: ReadContext) -> Iterator[Sample]:
    """Any registered modality's data key may hold a path or a list of paths."""
    return read_records(path, context)


def read_llava(path: Path, *, context: ReadContext) -> Iterator[Sample]:
    """LLaVA instruction data (LLaVA-1.5's mix665k included): an optional ``image`` key, human/gpt
    ``conversations``, ShareGPT text-only records with ``model``."""
    return read_records(path, context, allowed_keys={"image"})


def read_lamm(path: Path, *, context: ReadContext) -> Iterator[Sample]:
    """LAMM 2D (``image``) and 3D (``pcl``) instruction files as LAMM publishes them; ``task_type``
    selects the system message. LAMM's text carries no placeholder: the inputs' placeholders go at
    the start of the first human turn, where LAMM's loader puts the vision tokens (a placeholder
    already in the text, as LAMM's newer framework writes, is used as it stands). LAMM's model encodes
    an input for every sample and skips a record lacking one: here such a record is a
    :class:`DataError` (skipped and counted with ``on_bad_record``), never a text-only sample."""

    def system_for(obj: Any) -> str | None:
        # "normal" (and a task LAMM does not name): the chat template's system message, as in LAMM
        return LAMM_SYSTEM_MESSAGES.get(str(obj.get("task_type", "normal"))) if isinstance(obj, dict) else None

    return read_records(path, context, system_for=system_for, implicit_placeholders=True, require_input=True)


def head_records(path: Path, n: int) -> list[Any]:
    """Up to ``n`` leading record objects (for reader detection), without loading a large JSON list
    when they fit in its first MiB. Unparseable JSONL lines and non-object records are passed over;
    file-level problems raise :class:`DataError`."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 20)
    stripped = head.lstrip()
    if stripped[:1] == b"[":
        decoder = json.JSONDecoder()
        try:
            text = stripped[1:].decode("utf-8")
        except UnicodeDecodeError as exc:
            text = stripped[1:exc.start + 1].decode("utf-8")
        out, pos = [], 0
        while len(out) < n:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text) or text[pos] == "]":
                return [o for o in out if isinstance(o, dict)] if pos < len(text) else _slow_head(path, n)
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except (ValueError, RecursionError):
                return _slow_head(path, n)  # cut mid-record: read it properly
            out.append(obj)
        return [o for o in out if isinstance(o, dict)]
    return _slow_head(path, n)


def _slow_head(path: Path, n: int) -> list[Any]:
    out = []
    for _, obj in iter_raw_records(path, on_bad_line=lambda _err: None):
        if isinstance(obj, dict):
            out.append(obj)
        if len(out) >= n:
            break
    return out


def detect_lamm(path: Path, first_record: Any) -> bool:
    return isinstance(first_record, dict) and "task_type" in first_record


def detect_llava(path: Path, first_record: Any) -> bool:
    if not isinstance(first_record, dict) or "conversations" not in first_record:
        return False
    return set(first_record) <= {"id", "image", "conversations", "model"}


def detect_generic(path: Path, first_record: Any) -> bool:
    return isinstance(first_record, dict) and ("conversations" in first_record or "messages" in first_record)

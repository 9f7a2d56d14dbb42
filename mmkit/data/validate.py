"""Check instruction data before any training: ``mmkit data validate`` and the checks ``mmkit train``
runs up front.

Per record: the schema and turn order, one placeholder per input of each modality, paths inside the
data root, every input file present and decodable by its modality's ``load`` (in parallel, each
distinct file once), the tokenised length including the modality tokens within the maximum (when
a tokenizer is given), and unknown keys (warnings). The result is a :class:`Report`: a summary per
file, every issue with its file, record index, record id, severity and reason, and a per-record
status list for ``--json``.

Nothing here imports torch; the encode check (the one training runs: template, answers located,
placeholders, length with modality tokens) needs a tokenizer (transformers) only when asked for.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs

from mmkit.data import vocab
from mmkit.records import ReadContext, Sample
from mmkit.errors import DataError, InputError, MmkitError
from mmkit.specs import LazyRef, resolve

ERROR, WARNING = "error", "warning"
#: Decoding more files than this goes to a process pool (below it, the pool's start-up costs more).
_POOL_THRESHOLD = 256
_CHUNK = 512


@attrs.frozen
class Issue:
    """One problem: ``record`` is the record's index in its file (``None`` for the whole file)."""

    file: str
    record: int | None
    id: str | None
    severity: str  # "error" or "warning"
    kind: str  # schema, empty_turn, turn_order, placeholder, path, missing_file, corrupt_file, too_long, ...
    reason: str
    input: str | None = None  # the input file concerned, for file problems

    @property
    def where(self) -> str:
        if self.record is None:
            return self.file
        rid = f" (id {self.id})" if self.id is not None else ""
        return f"{self.file} record {self.record}{rid}"

    def message(self) -> str:
        return f"{self.where}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class FileSummary:
    file: str
    reader: str | None = None
    records: int = 0
    ok: int = 0
    with_errors: int = 0
    with_warnings: int = 0
    file_error: str | None = None  # the file could not be read at all (or reading stopped early)


@attrs.define
class Report:
    files: list[FileSummary] = attrs.field(factory=list)
    issues: list[Issue] = attrs.field(factory=list)
    #: per file: [(record index, record id)] in file order, every record read (for the per-record report)
    record_ids: dict[str, list[tuple[int, str | None]]] = attrs.field(factory=dict)
    notes: list[str] = attrs.field(factory=list)  # checks that were skipped, and why
    inputs_checked: int = 0  # distinct input files checked
    seconds: float = 0.0

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == ERROR]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def num_records(self) -> int:
        return sum(f.records for f in self.files)

    def kind_counts(self) -> list[tuple[str, str, int, str]]:
        """``(severity, kind, count, first message)``, errors first."""
        counts: Counter[tuple[str, str]] = Counter()
        first: dict[tuple[str, str], str] = {}
        for issue in self.issues:
            key = (issue.severity, issue.kind)
            counts[key] += 1
            first.setdefault(key, issue.message())
        order = sorted(counts, key=lambda k: (k[0] != ERROR, -counts[k], k[1]))
        return [(sev, kind, counts[(sev, kind)], first[(sev, kind)]) for sev, kind in order]

    def per_record(self) -> list[dict[str, Any]]:
        by_record: dict[tuple[str, int | None], list[Issue]] = {}
        for issue in self.issues:
            by_record.setdefault((issue.file, issue.record), []).append(issue)
        out = []
        for summary in self.files:
            whole = by_record.get((summary.file, None))
            if whole:  # whole-file issues (a file-level warning, such as unknown answer words, is not an error)
                status = ERROR if any(i.severity == ERROR for i in whole) else WARNING
                out.append({"file": summary.file, "record": None, "id": None, "status": status,
                            "issues": [_short(i) for i in whole]})
            for index, rid in self.record_ids.get(summary.file, []):
                issues = by_record.get((summary.file, index), [])
                status = ERROR if any(i.severity == ERROR for i in issues) else WARNING if issues else "ok"
                out.append({"file": summary.file, "record": index, "id": rid, "status": status,
                            "issues": [_short(i) for i in issues]})
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "summary": {
                "files": len(self.files),
                "records": self.num_records,
                "records_ok": sum(f.ok for f in self.files),
                "records_with_errors": sum(f.with_errors for f in self.files),
                "records_with_warnings": sum(f.with_warnings for f in self.files),
                "errors": len(self.errors),
                "warnings": len(self.warnings),
                "inputs_checked": self.inputs_checked,
                "seconds": round(self.seconds, 3),
                "by_kind": [{"severity": s, "kind": k, "count": c} for s, k, c, _ in self.kind_counts()],
                "notes": self.notes,
            },
            "files": [attrs.asdict(f) for f in self.files],
            "records": self.per_record(),
        }


def _short(issue: Issue) -> dict[str, Any]:
    out = {"severity": issue.severity, "kind": issue.kind, "reason": issue.reason}
    if issue.input is not None:
        out["input"] = issue.input
    return out


# -- the length check ------------------------------------------------------------------------------
class PromptLengths:
    """The encode check training runs (:meth:`PromptBuilder.encode_samples`: the template renders,
    the answers are located, placeholders match inputs, the length with modality tokens fits by
    :meth:`PromptBuilder.length_problem`, the one length rule), for many samples at once. Validation
    and packing use it, so a file that validates trains.

    ``counter`` (needed when a modality's ``tokens_per_input`` is ``None``): ``sample -> input_tokens``,
    each variable input's token count (see :class:`InputTokenCounter`)."""

    def __init__(self, prompts: Any, counter: Callable[[Sample], Mapping[str, Sequence[int]] | None] | None = None):
        self.prompts = prompts
        self.counter = counter

    def input_tokens(self, samples: Sequence[Sample]) -> list[Any] | None:
        if self.counter is None:
            return None
        return [self.counter(sample) for sample in samples]

    def check(self, samples: Sequence[Sample]) -> list[Any]:
        """Per sample: its :class:`~mmkit.prompt.EncodedSample`, or the :class:`DataError` training
        would raise for it (an input that cannot be counted gives its own error)."""
        if self.counter is None:
            return self.prompts.encode_samples(samples)
        out: list[Any] = [None] * len(samples)
        counted, tokens = [], []
        for i, sample in enumerate(samples):
            try:
                tokens.append(self.counter(sample))
                counted.append(i)
            except (InputError, DataError) as exc:
                out[i] = exc if isinstance(exc, DataError) else DataError(
                    sample.source, sample.index, str(exc), record_id=sample.id, kind="corrupt_file")
        for i, result in zip(counted, self.prompts.encode_samples([samples[i] for i in counted], tokens), strict=True):
            out[i] = result
        return out

    def __call__(self, samples: Sequence[Sample]) -> list[tuple[int, dict[str, int]]]:
        """``(length, inputs per modality)`` per sample; a sample that does not encode raises."""
        out = []
        for result in self.check(samples):
            if isinstance(result, DataError):
                raise result
            out.append((len(result.input_ids), dict(result.input_counts)))
        return out


class InputTokenCounter:
    """``sample -> {modality: [tokens of each input]}`` for the variable-size modalities: each input
    is loaded and preprocessed as training does (the installed modality's ``load`` and its tiny
    encoder's ``preprocess``, :mod:`mmkit.data.preprocess_check`) and counted by the encoder's
    ``num_tokens_for``. Counts are remembered per file."""

    def __init__(self, modalities: Iterable[str], host: Any = None):
        self.modalities = tuple(modalities)
        self.host = host
        self._seen: dict[tuple[str, str], int] = {}

    def __call__(self, sample: Sample) -> dict[str, list[int]]:
        from mmkit.data import preprocess_check

        out: dict[str, list[int]] = {}
        for modality in self.modalities:
            for path in sample.inputs.get(modality, ()):
                key = (modality, str(path))
                if key not in self._seen:
                    self._seen[key] = preprocess_check.count_tokens(modality, path, self.host)
                out.setdefault(modality, []).append(self._seen[key])
        return out


def prompt_builder_for(llm: str, markers: Mapping[str, Any], tokens_per_input: Mapping[str, int | None], *,
                       template: str | None = None, max_length: int | None = None) -> Any:
    """The :class:`~mmkit.prompt.PromptBuilder` training would use, from an LLM's tokenizer (hub id or
    local path) with mmkit's markers added; the template is checked before the tokenizer loads."""
    from mmkit.templates import check_early

    check_early(llm, template)
    from transformers import AutoTokenizer

    from mmkit.errors import ConfigError
    from mmkit.modeling.tokens import add_marker_tokens
    from mmkit.prompt import PromptBuilder

    try:
        from mmkit.demo.llm import resolve_llm

        tokenizer = AutoTokenizer.from_pretrained(resolve_llm(llm))  # "tiny": --llm tiny's tokenizer
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer of {llm!r}: {exc}") from exc
    add_marker_tokens(tokenizer, [t for spec in markers.values() for t in spec.special_tokens()])
    return PromptBuilder(tokenizer, markers, tokens_per_input, template=template, max_length=max_length)


def prompt_lengths_for(llm: str, markers: Mapping[str, Any], tokens_per_input: Mapping[str, int | None], *,
                       template: str | None = None, max_length: int | None = None) -> PromptLengths:
    """The encode check of :class:`PromptLengths` for an LLM's tokenizer (see :func:`prompt_builder_for`);
    inputs of a variable-size modality (``tokens_per_input`` ``None``) are counted by preprocessing them."""
    prompts = prompt_builder_for(llm, markers, tokens_per_input, template=template, max_length=max_length)
    variable = prompts.variable_modalities
    return PromptLengths(prompts, InputTokenCounter(variable) if variable else None)


def default_tokens_per_input(host: Any, modalities: Iterable[str]) -> dict[str, int | None]:
    """Tokens one input becomes with each modality's default encoder and projector in their tiny
    (random-init) configuration, the embedded demo's; ``None`` where the count differs per input (a
    variable-size encoder with a token-wise projector: inputs are counted by preprocessing them).
    Real encoders usually differ: give ``--tokens-per-input`` for them."""
    import torch

    from mmkit.modeling.components import build_encoder, build_projector

    out = {}
    with torch.random.fork_rng(devices=[]):
        for name in modalities:
            spec = host.modality(name)
            encoder = build_encoder(host, spec)
            projector = build_projector(host, spec.projector, in_dim=encoder.output_dim, out_dim=8,
                                        num_tokens=encoder.num_tokens,
                                        separator=bool(getattr(encoder, "uses_separators", False)))
            fixed = projector.num_output_tokens
            out[name] = None if fixed is None else int(fixed)
    return out


# -- file decoding -----------------------------------------------------------------------------------
def _check_chunk(items: Sequence[tuple[Any, str]], decode: bool) -> list[tuple[str, str, str] | None]:
    """``(kind, reason, path)`` per failed file, ``None`` per good one. Runs in pool workers."""
    loaders: dict[Any, Callable[[Path], Any]] = {}
    out: list[tuple[str, str, str] | None] = []
    for ref, path in items:
        p = Path(path)
        if not decode:
            out.append(None if p.is_file() else ("missing_file", f"file not found: {path}", path))
            continue
        load = loaders.get(ref)
        if load is None:
            load = loaders[ref] = resolve(ref)
        try:
            load(p)
        except InputError as exc:
            missing = not p.exists()
            kind = "missing_file" if missing else "corrupt_file"
            reason = f"file not found: {path}" if missing else f"cannot decode {path}: {exc.reason}"
            out.append((kind, reason, path))
        except Exception as exc:  # a plugin's loader failing in an unforeseen way is still this file's problem
            out.append(("corrupt_file", f"cannot decode {path}: {type(exc).__name__}: {exc}", path))
        else:
            out.append(None)
    return out


def check_files(paths: Mapping[str, LazyRef], *, decode: bool = True, workers: int | None = None
                ) -> dict[str, tuple[str, str]]:
    """Check (exist, and decode with the modality's ``load``) each distinct file; returns the failed
    ones as ``path -> (kind, reason)``. A process pool decodes many files in chunks; loaders given as
    callables rather than ``module:attr`` strings use threads (callables need not pickle)."""
    items = list(paths.items())
    if not items:
        return {}
    workers = workers or os.cpu_count() or 1
    refs = [(ref, path) for path, ref in items]
    chunks = [refs[i:i + _CHUNK] for i in range(0, len(refs), _CHUNK)]
    if workers <= 1 or len(refs) < _POOL_THRESHOLD or not decode:
        results = [r for chunk in chunks for r in _check_chunk(chunk, decode)]
    else:
        pool: Executor
        if all(isinstance(ref, str) for ref, _ in refs):
            import multiprocessing

            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
        else:
            pool = ThreadPoolExecutor(workers)
        with pool:
            results = [r for part in pool.map(_check_chunk, chunks, [decode] * len(chunks)) for r in part]
    return {r[2]: (r[0], r[1]) for r in results if r is not None}


class FileChecker:
    """Checks input files while records are still being read: each distinct file once, in chunks
    handed to a process pool as soon as a chunk is full (the pool starts with the first full chunk,
    so a small dataset never pays for one)."""

    def __init__(self, *, decode: bool = True, workers: int | None = None, processes: bool = True):
        self.decode = decode
        self.workers = workers or os.cpu_count() or 1
        self.processes = processes
        self.seen: set[str] = set()
        self.pending: list[tuple[Any, str]] = []
        self.futures: list[Any] = []
        self.pool: Executor | None = None

    def __len__(self) -> int:
        return len(self.seen)

    def add(self, path: str, ref: LazyRef) -> None:
        if path in self.seen:
            return
        self.seen.add(path)
        self.pending.append((ref, path))
        if len(self.pending) >= _CHUNK and self.decode and self.workers > 1:
            self._submit()

    def _submit(self) -> None:
        if self.pool is None:
            if self.processes:
                import multiprocessing

                method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
                self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(method))
            else:
                self.pool = ThreadPoolExecutor(self.workers)
        for start in range(0, len(self.pending), _CHUNK):
            self.futures.append(self.pool.submit(_check_chunk, self.pending[start:start + _CHUNK], self.decode))
        self.pending = []

    def finish(self) -> dict[str, tuple[str, str]]:
        """``path -> (kind, reason)`` for every file that failed."""
        if self.pool is None:
            return check_files({path: ref for ref, path in self.pending}, decode=self.decode, workers=self.workers)
        if self.pending:
            self._submit()
        with self.pool:
            results = [r for future in self.futures for r in future.result()]
        return {r[2]: (r[0], r[1]) for r in results if r is not None}


# -- validation --------------------------------------------------------------------------------------
def validate(files: Sequence[str | Path], *, host: Any = None, modalities: Sequence[str] | None = None,
             data_root: str | Path | None = None, allow_outside_root: bool = False, data_format: str | None = None,
             lengths: PromptLengths | None = None, decode_files: bool = True, workers: int | None = None,
             status: Callable[[str], None] | None = None, preprocess: bool = False) -> Report:
    """Check every record of ``files``; see the module docstring for the checks.

    ``lengths`` (see :func:`prompt_lengths_for`) enables the token-length check against its
    ``max_length``; without it the check is skipped and the report says so. ``decode_files=False``
    only checks that input files exist. ``preprocess=True`` (``mmkit data validate``) also runs each
    decoded input through the modality's tiny encoder's ``preprocess`` (imports torch), so a file that
    validates does not fail at training.
    """
    from mmkit.data.sources import pick_reader
    from mmkit.plugins import get_host

    start = time.perf_counter()
    host = host or get_host()
    say = status or (lambda _msg: None)
    names = list(modalities) if modalities else list(host.modalities())
    specs = {m: host.modality(m) for m in names}
    report = Report()
    if lengths is None:
        report.notes.append("token-length check skipped: no tokenizer (give --llm, and --tokens-per-input "
                            "for a non-default encoder)")
    if not decode_files:
        report.notes.append("input files were checked for existence only (--no-decode)")

    checker = FileChecker(decode=decode_files, workers=workers,
                          processes=all(isinstance(spec.load, str) for spec in specs.values()))
    checker.preprocess = preprocess  # decode with load + the tiny encoder's preprocess (mmkit.data.preprocess_check)
    users: dict[str, list[tuple[str, int, str]]] = {}  # input file -> records using it
    seen_ids: dict[str, tuple[str, int]] = {}
    to_measure: list[Sample] = []
    vocab_probe: list[Sample] = []  # answers checked for words the tokenizer cannot spell (mmkit.data.vocab)

    def add(issue: Issue) -> None:
        report.issues.append(issue)

    for file in files:
        source = str(file)
        summary = FileSummary(file=source)
        report.files.append(summary)
        ids: list[tuple[int, str | None]] = []
        report.record_ids[source] = ids
        say(f"reading {source}")

        def bad(exc: DataError, _source: str = source, _ids: list = ids) -> None:
            add(Issue(exc.source or _source, exc.record if isinstance(exc.record, int) else None, exc.record_id,
                      ERROR, exc.kind or "schema", exc.reason))
            if isinstance(exc.record, int):
                _ids.append((exc.record, exc.record_id))

        ctx = ReadContext(modalities=specs, data_root=Path(data_root) if data_root else None,
                          allow_outside_root=allow_outside_root, on_bad_record=bad)
        try:
            reader = pick_reader(host, Path(file), data_format)
            summary.reader = reader
            for sample in resolve(host.reader(reader).read)(Path(file), context=ctx):
                ids.append((sample.index, sample.id))
                _record_checks(sample, specs, add, checker, users, seen_ids, installed=host.modalities())
                if lengths is not None:
                    to_measure.append(sample)
                    if len(vocab_probe) < vocab.MAX_TEXTS:
                        vocab_probe.append(sample)
                    if len(to_measure) >= 1024:
                        _length_checks(lengths, to_measure, add)
                        to_measure.clear()
        except DataError as exc:
            where_record = exc.record if isinstance(exc.record, int) else None
            add(Issue(source, where_record, exc.record_id, ERROR, exc.kind or "file_format", exc.reason))
            if where_record is not None:  # a reader that stops at the first bad record
                ids.append((where_record, exc.record_id))
                summary.file_error = f"reading stopped at record {where_record}"
            else:
                summary.file_error = exc.reason
        except MmkitError as exc:
            add(Issue(source, None, None, ERROR, "file_format", str(exc)))
            summary.file_error = str(exc)
        except Exception as exc:  # a third-party reader's bug: this file, not a traceback
            add(Issue(source, None, None, ERROR, "reader_failed", f"the reader failed: {type(exc).__name__}: {exc}"))
            summary.file_error = f"reader failed: {type(exc).__name__}"
        if summary.file_error is None and not ids:
            add(Issue(source, None, None, ERROR, "file_format", "no records"))
            summary.file_error = "no records"
    if lengths is not None and to_measure:
        _length_checks(lengths, to_measure, add)
    if lengths is not None and vocab_probe:
        warning = vocab.unknown_words_warning(lengths.prompts.tokenizer, vocab_probe)
        if warning:
            add(Issue(vocab_probe[0].source, None, None, WARNING, "unknown_words", warning))

    say(f"checking {len(checker)} input files")
    failed = checker.finish()
    report.inputs_checked = len(checker)
    for path, (kind, reason) in failed.items():
        for source, index, rid in users[path]:
            add(Issue(source, index, rid, ERROR, kind, reason, input=path))

    _summarise(report)
    report.seconds = time.perf_counter() - start
    return report


def _record_checks(sample: Sample, specs: Mapping[str, Any], add: Callable[[Issue], None],
                   checker: FileChecker, users: dict[str, list[tuple[str, int, str]]],
                   seen_ids: dict[str, tuple[str, int]], installed: Mapping[str, Any] | None = None) -> None:
    from mmkit.data.sources import ignored_key_reason

    for key in sample.meta.get("unknown_keys", ()):  # training refuses such records (or skips them)
        add(Issue(sample.source, sample.index, sample.id, WARNING, "unknown_key",
                  ignored_key_reason(key, installed if installed is not None else specs, specs)
                  + " (ignored: `mmkit train` refuses the record, or leaves it out with --skip-bad-records)"))
    previous = seen_ids.get(sample.id)
    if previous is not None:
        add(Issue(sample.source, sample.index, sample.id, WARNING, "duplicate_id",
                  f"id {sample.id!r} also used by {previous[0]} record {previous[1]}"))
    else:
        seen_ids[sample.id] = (sample.source, sample.index)
    for modality, paths in sample.inputs.items():
        for path in paths:
            checker.add(path, _decoder(specs[modality]) if checker.preprocess else specs[modality].load)
            users.setdefault(path, []).append((sample.source, sample.index, sample.id))


def _decoder(spec: Any) -> Any:
    """The modality's ``load``, then its tiny encoder's ``preprocess`` (mmkit.data.preprocess_check), so
    a file that validates does not fail at training; a plugin given as callables is only loaded."""
    from mmkit.data import preprocess_check

    return preprocess_check.decoder(spec)


def _length_checks(lengths: PromptLengths, samples: Sequence[Sample], add: Callable[[Issue], None]) -> None:
    for sample, result in zip(samples, lengths.check(samples), strict=True):
        # an input that cannot be counted (a variable modality's file) is reported by the file check
        if isinstance(result, DataError) and result.kind not in ("corrupt_file", "missing_file"):
            add(Issue(sample.source, sample.index, sample.id, ERROR, result.kind or "encode", result.reason))


def _summarise(report: Report) -> None:
    errors: dict[str, set[int]] = {}
    warnings: dict[str, set[int]] = {}
    for issue in report.issues:
        if issue.record is None:
            continue
        (errors if issue.severity == ERROR else warnings).setdefault(issue.file, set()).add(issue.record)
    for summary in report.files:
        ids = report.record_ids.get(summary.file, [])
        # a record index can appear twice (a reader that reports and also yields); count records once
        records = {index for index, _ in ids}
        summary.records = len(records)
        bad = errors.get(summary.file, set())
        summary.with_errors = len(bad & records)
        summary.with_warnings = len((warnings.get(summary.file, set()) - bad) & records)
        summary.ok = summary.records - summary.with_errors

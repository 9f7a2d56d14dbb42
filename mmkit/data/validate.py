"""Check instruction data before any training: ``mmkit data validate`` and the checks ``mmkit train``
runs up front.

Per record: the schema and turn order, one placeholder per input of each modality, paths inside the
data root, every input file present and decodable by its modality's ``load`` (in parallel, each
distinct file once), the tokenised length including the modality tokens within the maximum (when
a tokenizer is given), and unknown keys (errors: training refuses such records). The result is a :class:`Report`: a summary per
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
from mmkit.data.preprocess_check import Decoder, EncoderChoice
from mmkit.records import ReadContext, Sample
from mmkit.errors import ConfigError, DataError, InputError, MmkitError
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
    is loaded and preprocessed as training does (the installed modality's ``load`` and the ``preprocess``
    of the encoder ``choices`` names, by default the modality's tiny one; :mod:`mmkit.data.preprocess_check`)
    and counted by ``tokens_per_input`` (the projector's fixed count, else the encoder's ``num_tokens_for``).
    Counts are remembered per file; :meth:`remember` takes counts (or failures) made elsewhere, such as
    the validator's file check, so an input is preprocessed once."""

    def __init__(self, modalities: Iterable[str], host: Any = None,
                 choices: Mapping[str, EncoderChoice] | None = None):
        self.modalities = tuple(modalities)
        self.host = host
        self.choices = dict(choices or {})
        self._seen: dict[tuple[str, str], int | InputError] = {}

    def remember(self, modality: str, path: str, count: int | InputError) -> None:
        self._seen[(modality, str(path))] = count

    def __call__(self, sample: Sample) -> dict[str, list[int]]:
        from mmkit.data import preprocess_check

        out: dict[str, list[int]] = {}
        for modality in self.modalities:
            for path in sample.inputs.get(modality, ()):
                key = (modality, str(path))
                if key not in self._seen:
                    self._seen[key] = preprocess_check.count_tokens(modality, path, self.host,
                                                                    self.choices.get(modality))
                known = self._seen[key]
                if isinstance(known, InputError):
                    raise known
                out.setdefault(modality, []).append(known)
        return out


def prompt_builder_for(llm: str, markers: Mapping[str, Any], tokens_per_input: Mapping[str, int | None], *,
                       template: str | None = None, max_length: int | None = None) -> Any:
    """The :class:`~mmkit.prompt.PromptBuilder` training would use, from an LLM's tokenizer (hub id or
    local path) with mmkit's markers added; the template is checked before the tokenizer loads."""
    from mmkit.templates import check_early

    check_early(llm, template)
    from transformers import AutoTokenizer

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
                       template: str | None = None, max_length: int | None = None,
                       choices: Mapping[str, EncoderChoice] | None = None) -> PromptLengths:
    """The encode check of :class:`PromptLengths` for an LLM's tokenizer (see :func:`prompt_builder_for`);
    inputs of a variable-size modality (``tokens_per_input`` ``None``) are counted by preprocessing them
    with the encoder ``choices`` names (default: the modality's tiny one)."""
    prompts = prompt_builder_for(llm, markers, tokens_per_input, template=template, max_length=max_length)
    variable = prompts.variable_modalities
    return PromptLengths(prompts, InputTokenCounter(variable, choices=choices) if variable else None)


def default_tokens_per_input(host: Any, modalities: Iterable[str],
                             choices: Mapping[str, EncoderChoice] | None = None) -> dict[str, int | None]:
    """Tokens one input becomes with each modality's encoder and projector: those ``choices`` names
    (a run's settings), else the modality's defaults in their tiny (random-init) configuration, the
    embedded demo's; ``None`` where the count differs per input (a variable-size encoder with a
    token-wise projector: inputs are counted by preprocessing them). Real encoders usually differ:
    give ``--tokens-per-input``, or the run's settings, for them."""
    import torch

    from mmkit.data.preprocess_check import build_projector_for
    from mmkit.modeling.components import build_encoder

    choices = choices or {}
    out = {}
    with torch.random.fork_rng(devices=[]):
        for name in modalities:
            choice = choices.get(name) or EncoderChoice()
            encoder = build_encoder(host, host.modality(name), encoder_name=choice.encoder,
                                    pretrained=choice.pretrained, options=dict(choice.options))
            fixed = build_projector_for(name, encoder, host, choice).num_output_tokens
            out[name] = None if fixed is None else int(fixed)
    return out


# -- file decoding -----------------------------------------------------------------------------------
#: One file's result: ``(path, (kind, reason) or None, token count or None)``; a count comes from a
#: decoder that counts (:class:`~mmkit.data.preprocess_check.Decoder` of a variable-size encoder).
Result = tuple[str, "tuple[str, str] | None", "int | None"]


def _check_chunk(items: Sequence[tuple[Any, str]], decode: bool) -> list[Result]:
    """One :data:`Result` per ``(decoder, path)``. Runs in pool workers."""
    loaders: dict[Any, Callable[[Path], Any]] = {}
    out: list[Result] = []
    for ref, path in items:
        p = Path(path)
        if not decode:
            present = p.is_file() or p.is_dir()  # a folder can be one input (e.g. numbered frames)
            out.append((path, None if present else ("missing_file", f"file not found: {path}"), None))
            continue
        load = loaders.get(ref)
        if load is None:
            load = loaders[ref] = resolve(ref)
        count = getattr(load, "count", None) if isinstance(load, Decoder) else None
        try:
            n = count(p) if count is not None else load(p)
        except InputError as exc:
            missing = not p.exists()
            kind = "missing_file" if missing else "corrupt_file"
            # The loader's own path when it names a file inside the input (a frame of a frame folder).
            reason = f"file not found: {path}" if missing else f"cannot decode {exc.path or path}: {exc.reason}"
            out.append((path, (kind, reason), None))
        except Exception as exc:  # a plugin's loader failing in an unforeseen way is still this file's problem
            out.append((path, ("corrupt_file", f"cannot decode {path}: {type(exc).__name__}: {exc}"), None))
        else:
            out.append((path, None, n if count is not None else None))
    return out


def _poolable(ref: Any) -> bool:
    """Process-pool workers can receive it: a ``module:attr`` string or a picklable :class:`Decoder`
    (other callables need not pickle: threads)."""
    return isinstance(ref, (str, Decoder))


def _run(refs: list[tuple[Any, str]], decode: bool, workers: int) -> list[Result]:
    chunks = [refs[i:i + _CHUNK] for i in range(0, len(refs), _CHUNK)]
    if workers <= 1 or len(refs) < _POOL_THRESHOLD or not decode:
        return [r for chunk in chunks for r in _check_chunk(chunk, decode)]
    pool: Executor
    if all(_poolable(ref) for ref, _ in refs):
        import multiprocessing

        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
    else:
        pool = ThreadPoolExecutor(workers)
    with pool:
        return [r for part in pool.map(_check_chunk, chunks, [decode] * len(chunks)) for r in part]


def check_files(paths: Mapping[str, LazyRef], *, decode: bool = True, workers: int | None = None
                ) -> dict[str, tuple[str, str]]:
    """Check (exist, and decode with the modality's ``load``) each distinct file; returns the failed
    ones as ``path -> (kind, reason)``. A process pool decodes many files in chunks; loaders given as
    callables rather than ``module:attr`` strings use threads (callables need not pickle)."""
    refs = [(ref, path) for path, ref in paths.items()]
    if not refs:
        return {}
    results = _run(refs, decode, workers or os.cpu_count() or 1)
    return {path: problem for path, problem, _ in results if problem is not None}


class FileChecker:
    """Checks input files while records are still being read: each distinct file once, in chunks
    handed to a process pool as soon as a chunk is full (the pool starts with the first full chunk,
    so a small dataset never pays for one). Results gather in ``failed`` (``path -> (kind, reason)``)
    and ``counts`` (``path -> tokens``, from decoders that count); ``done`` holds every checked path."""

    def __init__(self, *, decode: bool = True, workers: int | None = None, processes: bool = True):
        self.decode = decode
        self.workers = workers or os.cpu_count() or 1
        self.processes = processes
        self.seen: set[str] = set()
        self.pending: list[tuple[Any, str]] = []
        self.futures: list[Any] = []
        self.pool: Executor | None = None
        self.failed: dict[str, tuple[str, str]] = {}
        self.counts: dict[str, int] = {}
        self.done: set[str] = set()

    def __len__(self) -> int:
        return len(self.seen)

    def add(self, path: str, ref: LazyRef) -> None:
        if path in self.seen:
            return
        self.seen.add(path)
        self.pending.append((ref, path))
        if len(self.pending) >= _CHUNK and self.decode and self.workers > 1:
            self._submit()

    def _collect(self, results: Iterable[Result]) -> None:
        for path, problem, count in results:
            self.done.add(path)
            if problem is not None:
                self.failed[path] = problem
            elif count is not None:
                self.counts[path] = count

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

    def drain(self) -> None:
        """Check every file added so far now (waiting for the pool's chunks), so their results are known."""
        if self.pool is None:
            self._collect(_check_chunk(self.pending, self.decode))
            self.pending = []
            return
        if self.pending:
            self._submit()
        for future in self.futures:
            self._collect(future.result())
        self.futures = []

    def finish(self) -> dict[str, tuple[str, str]]:
        """``path -> (kind, reason)`` for every file that failed."""
        if self.pool is None:
            self._collect(_run(self.pending, self.decode, self.workers))
            self.pending = []
            return self.failed
        if self.pending:
            self._submit()
        with self.pool:
            for future in self.futures:
                self._collect(future.result())
        self.futures = []
        self.pool = None  # shut down; a second finish() finds nothing left
        return self.failed


# -- validation --------------------------------------------------------------------------------------
#: Records waiting for their inputs' counts from the file check before the length check; past this
#: many the checker is drained (memory stays bounded on large datasets).
_PARKED = 4096


def validate(files: Sequence[str | Path], *, host: Any = None, modalities: Sequence[str] | None = None,
             data_root: str | Path | None = None, allow_outside_root: bool = False, data_format: str | None = None,
             lengths: PromptLengths | None = None, decode_files: bool = True, workers: int | None = None,
             status: Callable[[str], None] | None = None, preprocess: bool = False,
             choices: Mapping[str, EncoderChoice] | None = None) -> Report:
    """Check every record of ``files``; see the module docstring for the checks.

    ``lengths`` (see :func:`prompt_lengths_for`) enables the token-length check against its
    ``max_length``; without it the check is skipped and the report says so. ``decode_files=False``
    only checks that input files exist. ``preprocess=True`` (``mmkit data validate``) also runs each
    decoded input through the ``preprocess`` of its modality's encoder (imports torch): the one
    ``choices`` names (a run's settings, see :func:`~mmkit.data.preprocess_check.encoder_choices`),
    else the modality's tiny encoder; so a file that validates does not fail at training. When the
    length check counts a variable-size modality with the same encoder, the file check's counts are
    used: each input is preprocessed once.
    """
    from mmkit.plugins import get_host

    start = time.perf_counter()
    host = host or get_host()
    say = status or (lambda _msg: None)
    root = Path(data_root) if data_root else None
    if root is not None and not root.is_dir():  # one error, before any encoder is built
        raise ConfigError(f"data_root {root}: no such directory")
    names = list(modalities) if modalities else list(host.modalities())
    specs = {m: host.modality(m) for m in names}
    choices = dict(choices or {})
    if preprocess and decode_files:
        _build_chosen_encoders(host, specs, choices)
    report = Report()
    report.notes.extend(_notes(specs, choices, lengths=lengths, decode_files=decode_files, preprocess=preprocess))
    run = _Validation.plan(report, host, specs, choices, lengths=lengths, decode_files=decode_files,
                           workers=workers, preprocess=preprocess)
    for file in files:
        run.read_file(file, say, data_root=root, allow_outside_root=allow_outside_root, data_format=data_format)
    run.finish_lengths()
    say(f"checking {len(run.checker)} input files")
    run.finish_files()
    _summarise(report)
    report.seconds = time.perf_counter() - start
    return report


def _build_chosen_encoders(host: Any, specs: Mapping[str, Any], choices: Mapping[str, EncoderChoice]) -> None:
    """Build the run's (non-default) encoders once, here: an option the encoder refuses is a
    ConfigError / PluginError of the configuration, not every input file reported as undecodable."""
    from mmkit.data import preprocess_check

    for modality, choice in choices.items():
        spec = specs.get(modality)
        if spec is not None and choice != EncoderChoice() and isinstance(spec.load, str):
            preprocess_check.encoder_for(modality, host, choice)


def _notes(specs: Mapping[str, Any], choices: Mapping[str, EncoderChoice], *, lengths: PromptLengths | None,
           decode_files: bool, preprocess: bool) -> list[str]:
    """The report's notes on checks skipped or narrowed, and on the encoders inputs were preprocessed with."""
    notes = []
    if lengths is None:
        notes.append("token-length check skipped: no tokenizer (give --llm, and --tokens-per-input "
                     "for a non-default encoder)")
    if not decode_files:
        notes.append("input files were checked for existence only (--no-decode)")
    chosen = {m: c for m, c in choices.items() if m in specs and c != EncoderChoice()}
    if chosen and preprocess and decode_files:
        notes.append("inputs preprocessed with the run's encoders: " + "; ".join(
            f"{m}: {_describe(specs[m], c)}" for m, c in chosen.items()))
    return notes


@attrs.define
class _Validation:
    """The state of one :func:`validate` run: records are checked as they are read, their input files
    go to the :class:`FileChecker`, and their length checks run in batches; a record whose variable-size
    inputs the file check counts (``shared`` modalities) is parked until those counts are known."""

    report: Report
    host: Any
    specs: dict[str, Any]
    decoders: dict[str, Any]  # per modality: what the file check decodes an input with
    checker: FileChecker
    lengths: PromptLengths | None
    shared: set[str]  # modalities whose inputs the file check counts with the length check's encoder
    shared_paths: dict[str, str] = attrs.field(factory=dict)  # input file -> its (shared) modality
    parked: list[Sample] = attrs.field(factory=list)  # records waiting for their inputs' counts
    users: dict[str, list[tuple[str, int, str]]] = attrs.field(factory=dict)  # input file -> records using it
    seen_ids: dict[str, tuple[str, int]] = attrs.field(factory=dict)
    to_measure: list[Sample] = attrs.field(factory=list)
    vocab_probe: list[Sample] = attrs.field(factory=list)  # answers checked for words the tokenizer cannot spell

    @classmethod
    def plan(cls, report: Report, host: Any, specs: dict[str, Any], choices: Mapping[str, EncoderChoice], *,
             lengths: PromptLengths | None, decode_files: bool, workers: int | None, preprocess: bool) -> _Validation:
        checker = FileChecker(decode=decode_files, workers=workers,
                              processes=all(isinstance(spec.load, str) for spec in specs.values()))
        counter = lengths.counter if lengths is not None else None
        counted = set(counter.modalities) if decode_files and isinstance(counter, InputTokenCounter) else set()
        # load + the chosen encoder's preprocess (mmkit.data.preprocess_check), or only load
        decoders = {m: _decoder(spec, choices.get(m), counting=m in counted) if preprocess else spec.load
                    for m, spec in specs.items()}
        # modalities whose inputs the file check counts with the very encoder the length check counts with
        shared = {m for m in counted if isinstance(decoders.get(m), Decoder)
                  and (decoders[m].choice or EncoderChoice()) == (counter.choices.get(m) or EncoderChoice())}
        return cls(report, host, specs, decoders, checker, lengths, shared)

    def add(self, issue: Issue) -> None:
        self.report.issues.append(issue)

    def read_file(self, file: str | Path, say: Callable[[str], None], *, data_root: Path | None,
                  allow_outside_root: bool, data_format: str | None) -> None:
        """Read one file, checking each record; a file that cannot be read is one issue, not a traceback."""
        from mmkit.data.sources import pick_reader

        source = str(file)
        summary = FileSummary(file=source)
        self.report.files.append(summary)
        ids: list[tuple[int, str | None]] = []
        self.report.record_ids[source] = ids
        say(f"reading {source}")
        ctx = ReadContext(modalities=self.specs, data_root=data_root, allow_outside_root=allow_outside_root,
                          on_bad_record=self._bad_record_handler(source, ids))
        try:
            reader = pick_reader(self.host, Path(file), data_format)
            summary.reader = reader
            for sample in resolve(self.host.reader(reader).read)(Path(file), context=ctx):
                ids.append((sample.index, sample.id))
                self.check_record(sample)
        except Exception as exc:  # a third-party reader's bug: this file, not a traceback
            self._reading_failed(exc, source, summary, ids)
        if summary.file_error is None and not ids:
            self.add(Issue(source, None, None, ERROR, "file_format", "no records"))
            summary.file_error = "no records"

    def _bad_record_handler(self, source: str, ids: list[tuple[int, str | None]]) -> Callable[[DataError], None]:
        """The reader's ``on_bad_record``: the record's issue, and the record counted in its file."""

        def bad(exc: DataError) -> None:
            self.add(Issue(exc.source or source, exc.record if isinstance(exc.record, int) else None, exc.record_id,
                           ERROR, exc.kind or "schema", exc.reason))
            if isinstance(exc.record, int):
                ids.append((exc.record, exc.record_id))

        return bad

    def _reading_failed(self, exc: Exception, source: str, summary: FileSummary,
                        ids: list[tuple[int, str | None]]) -> None:
        if isinstance(exc, DataError):
            where_record = exc.record if isinstance(exc.record, int) else None
            self.add(Issue(source, where_record, exc.record_id, ERROR, exc.kind or "file_format", exc.reason))
            if where_record is not None:  # a reader that stops at the first bad record
                ids.append((where_record, exc.record_id))
                summary.file_error = f"reading stopped at record {where_record}"
            else:
                summary.file_error = exc.reason
        elif isinstance(exc, MmkitError):
            self.add(Issue(source, None, None, ERROR, "file_format", str(exc)))
            summary.file_error = str(exc)
        elif isinstance(exc, FileNotFoundError):  # the words train uses for the same file
            self.add(Issue(source, None, None, ERROR, "missing_file", "file not found"))
            summary.file_error = "file not found"
        else:
            self.add(Issue(source, None, None, ERROR, "reader_failed",
                           f"the reader failed: {type(exc).__name__}: {exc}"))
            summary.file_error = f"reader failed: {type(exc).__name__}"

    def check_record(self, sample: Sample) -> None:
        _record_checks(sample, self.specs, self.add, self.checker, self.users, self.seen_ids,
                       installed=self.host.modalities(), decoders=self.decoders)
        if self.lengths is not None:
            self._queue_length_check(sample)

    def _queue_length_check(self, sample: Sample) -> None:
        if len(self.vocab_probe) < vocab.MAX_TEXTS:
            self.vocab_probe.append(sample)
        if any(p not in self.checker.done for m in self.shared for p in sample.inputs.get(m, ())):
            self._park(sample)  # measured once the file check has counted its inputs
            return
        self.to_measure.append(sample)
        if len(self.to_measure) >= 1024:
            _length_checks(self.lengths, self.to_measure, self.add)
            self.to_measure.clear()

    def _park(self, sample: Sample) -> None:
        for m in self.shared:
            for p in sample.inputs.get(m, ()):
                if p not in self.checker.done:
                    self.shared_paths.setdefault(p, m)
        self.parked.append(sample)
        if len(self.parked) >= _PARKED:
            self.measure_parked(final=False)

    def measure_parked(self, final: bool) -> None:
        """Hand the file check's counts to the length check's counter, then measure every parked record
        whose inputs are all counted."""
        if final:
            self.checker.finish()
        else:
            self.checker.drain()
        counter = self.lengths.counter if self.lengths is not None else None
        for path, modality in list(self.shared_paths.items()):
            if path in self.checker.done:
                problem, count = self.checker.failed.get(path), self.checker.counts.get(path)
                if problem is not None or count is not None:  # else the counter counts it itself
                    counter.remember(modality, path, InputError(path, problem[1]) if problem else count)
                del self.shared_paths[path]
        waiting = [any(p in self.shared_paths for m in self.shared for p in s.inputs.get(m, ()))
                   for s in self.parked]
        ready = [s for s, wait in zip(self.parked, waiting) if not wait]
        self.parked = [s for s, wait in zip(self.parked, waiting) if wait]
        for start_at in range(0, len(ready), 1024):
            _length_checks(self.lengths, ready[start_at:start_at + 1024], self.add)

    def finish_lengths(self) -> None:
        """The length checks still batched, and the unknown-words warning over the sampled answers."""
        if self.lengths is not None and self.to_measure:
            _length_checks(self.lengths, self.to_measure, self.add)
        if self.lengths is not None and self.vocab_probe:
            warning = vocab.unknown_words_warning(self.lengths.prompts.tokenizer, self.vocab_probe)
            if warning:
                self.add(Issue(self.vocab_probe[0].source, None, None, WARNING, "unknown_words", warning))

    def finish_files(self) -> None:
        """Wait for the file check (and the records parked on it); each failed file is an issue of every
        record using it."""
        if self.parked:
            self.measure_parked(final=True)
        failed = self.checker.finish()
        self.report.inputs_checked = len(self.checker)
        for path, (kind, reason) in failed.items():
            for source, index, rid in self.users[path]:
                self.add(Issue(source, index, rid, ERROR, kind, reason, input=path))


def _record_checks(sample: Sample, specs: Mapping[str, Any], add: Callable[[Issue], None],
                   checker: FileChecker, users: dict[str, list[tuple[str, int, str]]],
                   seen_ids: dict[str, tuple[str, int]], installed: Mapping[str, Any] | None = None,
                   decoders: Mapping[str, Any] | None = None) -> None:
    from mmkit.data.sources import ignored_key_reason

    for key in sample.meta.get("unknown_keys", ()):  # an error: training refuses such records (or skips them)
        add(Issue(sample.source, sample.index, sample.id, ERROR, "unknown_key",
                  ignored_key_reason(key, installed if installed is not None else specs, specs)
                  + " (`mmkit train` refuses the record, or leaves it out with --skip-bad-records)"))
    previous = seen_ids.get(sample.id)
    if previous is not None:
        add(Issue(sample.source, sample.index, sample.id, WARNING, "duplicate_id",
                  f"id {sample.id!r} also used by {previous[0]} record {previous[1]}"))
    else:
        seen_ids[sample.id] = (sample.source, sample.index)
    for modality, paths in sample.inputs.items():
        for path in paths:
            checker.add(path, (decoders or {}).get(modality) or specs[modality].load)
            users.setdefault(path, []).append((sample.source, sample.index, sample.id))


def _describe(spec: Any, choice: EncoderChoice) -> str:
    """``clip (pretrained P) {'anyres': True}, projector resampler`` for the report's note."""
    text = choice.encoder or spec.encoder
    if choice.pretrained:
        text += f" (pretrained {choice.pretrained})"
    if choice.options:
        text += f" {dict(choice.options)}"
    if choice.projector or choice.projector_options:
        text += f", projector {choice.projector or spec.projector}"
        text += f" {dict(choice.projector_options)}" if choice.projector_options else ""
    return text


def _decoder(spec: Any, choice: EncoderChoice | None = None, *, counting: bool = False) -> Any:
    """The modality's ``load``, then the chosen (default: tiny) encoder's ``preprocess``
    (mmkit.data.preprocess_check), so a file that validates does not fail at training; a plugin given
    as callables is only loaded. ``counting``: a :class:`Decoder`, which also counts each input."""
    from mmkit.data import preprocess_check

    return preprocess_check.decoder(spec, choice, counting=counting)


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

"""Turn samples into model inputs: load and preprocess each input file, tokenise through the prompt
builder, and pad into batches."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from mmkit.data.batch import Batch
from mmkit.data.feature_cache import encode_frozen, split_features
from mmkit.errors import DataError, InputError
from mmkit.modeling.encoder import ModalityEncoder, collate_checked, count_tokens
from mmkit.modeling.features import RaggedFeatures
from mmkit.prompt import IGNORE_INDEX, EncodedSample, PromptBuilder
from mmkit.records import Sample


@attrs.frozen
class Skipped:
    """A sample left out under ``--skip-bad-records``, and why. With ``error`` set, the record's
    failure must stop the run: the dataset defers it (a data-loader worker cannot raise it intact)
    and :class:`Batches` raises it in the main process."""

    where: str
    reason: str
    error: DataError | None = attrs.field(default=None, eq=False)


Preprocess = Callable[[Path], Any]


class SampleDataset(torch.utils.data.Dataset):
    """Samples -> ``{"id", "input_ids", "labels", "modalities", "inputs"}`` items.

    ``inputs[m]`` holds the sample's preprocessed inputs of modality ``m`` in placeholder order.
    ``counters[m]`` (variable-size modalities, see :func:`input_counters`): the prompt slots an input
    gets; such inputs are preprocessed *before* the prompt is encoded, so it reserves exactly that
    many. With a feature ``cache`` (:class:`mmkit.data.feature_cache.FeatureCache`), items also carry
    ``features[m]``: one cached entry per input, or ``None`` where the cache had no good entry, in
    which case ``inputs[m]`` holds those inputs preprocessed and ``cache_keys[m]`` their keys.
    ``defer_errors``: a failing record becomes a :class:`Skipped` carrying its error (raised by
    :class:`Batches` in the main process) instead of raising here.
    """

    def __init__(self, samples: Sequence[Sample], prompts: PromptBuilder, preprocess: Mapping[str, Preprocess],
                 *, counters: Mapping[str, InputTokens] | None = None, skip_bad_records: bool = False,
                 cache: Any = None, defer_errors: bool = False):
        self.samples = list(samples)
        self.prompts = prompts
        self.preprocess = dict(preprocess)
        self.counters = dict(counters or {})
        self.skip_bad_records = skip_bad_records
        self.cache = cache
        self.defer_errors = defer_errors

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        sample = self.samples[index]
        try:
            return self.encode(sample)
        except (DataError, InputError) as exc:
            if not self.skip_bad_records:
                if not self.defer_errors:
                    raise _as_data_error(sample, exc) from None
                return Skipped(sample.where, str(exc), error=_as_data_error(sample, exc))
            return Skipped(sample.where, str(exc))

    def encode(self, sample: Sample, encoded: EncodedSample | None = None) -> dict[str, Any]:
        variable = any(m in self.counters for m in sample.inputs)
        if encoded is None and not variable:
            encoded = self.prompts.encode_sample(sample)  # cheap checks before the costly preprocessing
        inputs: dict[str, list[Any]] = {}
        features: dict[str, list[Any]] = {}
        keys: dict[str, list[str | None]] = {}
        tokens: dict[str, list[int]] = {}
        for modality, paths in sample.inputs.items():
            if modality not in self.preprocess:
                raise DataError(sample.source, sample.index, f"has {modality} input but the model has no {modality} modality")
            counter = self.counters.get(modality)
            for p in paths:
                feat = key = None
                if self.cache is not None:
                    try:
                        feat, key = self.cache.lookup(modality, p)
                    except OSError:  # missing or unreadable: preprocessing names the problem
                        feat, key = None, None
                    features.setdefault(modality, []).append(feat)
                if feat is None:
                    item = self.preprocess[modality](Path(p))
                    inputs.setdefault(modality, []).append(item)
                    if self.cache is not None:
                        keys.setdefault(modality, []).append(key)
                    if counter is not None:
                        tokens.setdefault(modality, []).append(counter.of_item(item))
                elif counter is not None:
                    tokens.setdefault(modality, []).append(counter.of_features(feat))
        if encoded is None:
            encoded = self.prompts.encode_sample(sample, input_tokens=tokens) if tokens else \
                self.prompts.encode_sample(sample)
        item = {"id": sample.id, "input_ids": encoded.input_ids, "labels": encoded.labels,
                "modalities": tuple(sample.modalities), "inputs": inputs}
        if self.cache is not None:
            item["features"] = features
            item["cache_keys"] = keys
        return item


@attrs.frozen
class InputTokens:
    """The prompt slots one input of a variable-size modality with a token-wise projector gets (a
    projector with a fixed output count needs no counter: :func:`input_counters`): the encoder's
    ``num_tokens_for`` of the preprocessed input, or the rows of its cached features. ``counted``
    remembers :func:`count_input_tokens`' counts per file, so the read check and packing preprocess
    each input once."""

    encoder: Any = attrs.field(eq=False)
    counted: dict[str, int] = attrs.field(factory=dict, eq=False, repr=False)

    def of_item(self, item: Any) -> int:
        return count_tokens(self.encoder, item)

    def of_features(self, features: Any) -> int:
        values = features.values if isinstance(features, RaggedFeatures) else features
        return int(values.shape[0])


def input_counters(encoders: Mapping[str, Any], projectors: Mapping[str, Any]) -> dict[str, InputTokens]:
    """:class:`InputTokens` of each variable-size modality (``num_tokens is None``); fixed ones need
    none (the prompt builder knows their count)."""
    out = {}
    for m, enc in encoders.items():
        if getattr(enc, "num_tokens", None) is None and getattr(projectors[m], "num_output_tokens", None) is None:
            out[m] = _COUNTERS.get(enc) or _COUNTERS.setdefault(enc, InputTokens(enc))
    return out


#: one :class:`InputTokens` per encoder object, so counts made before training are reused
_COUNTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def collate_fns(encoders: Mapping[str, Any]) -> dict[str, Collate]:
    """Each modality's ``collate`` where its encoder defines its own (the others stack, as before)."""
    return {m: functools.partial(collate_checked, enc) for m, enc in encoders.items()
            if type(enc).collate is not ModalityEncoder.collate}


def count_input_tokens(samples: Sequence[Sample], preprocess: Mapping[str, Preprocess],
                       counters: Mapping[str, InputTokens], *, cache: Any = None
                       ) -> list[dict[str, list[int]] | None]:
    """Each sample's token count per input of its variable-size modalities (``None`` for a sample
    with none), computed once before training so packing and grouping budget real lengths: from the
    cached features when a feature cache holds them, else from the preprocessed input. An input that
    fails to load counts 0 here; the dataset meets it again and names it."""
    out: list[dict[str, list[int]] | None] = []
    for sample in samples:
        counts: dict[str, list[int]] = {}
        for modality, paths in sample.inputs.items():
            counter = counters.get(modality)
            if counter is None or modality not in preprocess:
                continue
            for p in paths:
                n = counter.counted.get(str(p))
                if n is None and cache is not None:
                    try:
                        feat, _ = cache.lookup(modality, p)
                    except OSError:
                        feat = None
                    n = None if feat is None else counter.of_features(feat)
                if n is None:
                    try:
                        n = counter.of_item(preprocess[modality](Path(p)))
                    except (DataError, InputError):
                        n = 0
                    else:
                        counter.counted[str(p)] = n
                counts.setdefault(modality, []).append(n)
        out.append(counts or None)
    return out


def _as_data_error(sample: Sample, exc: Exception) -> DataError:
    """The error naming the record (file, index, id) and the reason."""
    if isinstance(exc, DataError):
        if exc.record_id is None and exc.source == sample.source and exc.record == sample.index:
            return DataError(exc.source, exc.record, exc.reason, record_id=sample.id, kind=exc.kind)
        return exc
    kind = None
    if isinstance(exc, InputError):
        kind = "missing_file" if exc.reason.startswith("file not found") else "corrupt_file"
    return DataError(sample.source, sample.index, str(exc), record_id=sample.id, kind=kind)


def make_preprocessor(load: Callable[[Path], Any], preprocess: Callable[[Any], Any], *,
                      modality: str | None = None, plugin: str | None = None) -> Preprocess:
    """``path -> preprocessed input``: the modality's ``load`` then its encoder's ``preprocess``.
    Whatever either raises becomes an :class:`InputError` naming the file, the plugin and the
    modality in one line (the dataset adds the record), so ``--skip-bad-records`` skips it like a bad
    file. A fixed-size encoder (``input_shape`` set) must return a tensor of that shape; any encoder's
    floating-point values must be finite (integer leaves such as a graph's ``edge_index`` are not
    checked). ``modality`` and ``plugin`` default to what the factory stamped on the encoder."""
    encoder = getattr(preprocess, "__self__", None)
    origin = dict(getattr(encoder, "_mmkit_origin", None) or {})
    modality = modality or origin.get("modality")
    plugin = plugin or origin.get("plugin") or getattr(load, "__module__", "?").split(".")[0]
    shape = getattr(encoder, "input_shape", ())
    shape = tuple(shape) if shape else None
    who = f"plugin {plugin}" + (f", modality {modality}" if modality else "")

    def run(path: Path) -> Any:
        raw = _call(load, path, path, f"{who}: load")
        item = _call(preprocess, raw, path, f"{who}: preprocess")
        if shape is not None:
            if not isinstance(item, torch.Tensor):
                raise InputError(path, f"{who}: preprocess returned a {type(item).__name__}, declared a tensor "
                                       f"of shape {list(shape)}")
            if tuple(item.shape) != shape:
                raise InputError(path, f"{who}: preprocess returned shape {list(item.shape)}, the encoder declares "
                                       f"input_shape {list(shape)}")
        if not all(bool(torch.isfinite(t).all()) for t in floating_leaves(item)):
            raise InputError(path, f"{who}: preprocessing produced NaN or inf values")
        return item

    return run


def floating_leaves(obj: Any) -> list[torch.Tensor]:
    """The floating-point tensors in a preprocessed input (a tensor, nested lists / tuples / dicts,
    or an object with ``apply(fn)`` over its tensors such as a torch-geometric ``Data``)."""
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in floating_leaves(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in floating_leaves(o)]
    found: list[torch.Tensor] = []
    apply = getattr(obj, "apply", None)
    if callable(apply) and not isinstance(obj, torch.nn.Module):
        def visit(t: torch.Tensor) -> torch.Tensor:
            if t.is_floating_point():
                found.append(t)
            return t

        apply(visit)
    return found


def _call(fn: Callable[[Any], Any], arg: Any, path: Path, what: str) -> Any:
    """``fn(arg)``; an :class:`InputError` gets the file if it lacks one, anything else (a plugin's
    ``ValueError``, ``IndexError``, ...) becomes one naming the file, the plugin and the reason."""
    try:
        return fn(arg)
    except InputError as exc:
        if exc.path is not None:
            raise
        raise InputError(path, f"{what}: {exc.reason}") from None
    except (DataError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        message = " ".join(str(exc).split()) or "(no message)"
        raise InputError(path, f"{what} raised {type(exc).__name__}: {message}") from exc


def separate_skipped(items: Sequence[dict[str, Any] | Skipped], collator: Any
                     ) -> tuple[list[dict[str, Any]], list[Skipped], Batch | None]:
    """The usable items, the skipped ones, and the batch to return instead when none is usable.
    Skipped items are kept on ``collator.skipped`` when the collator records them itself."""
    good, bad = [], []
    for item in items:
        (bad if isinstance(item, Skipped) else good).append(item)
    if collator.record_skipped:
        collator.skipped.extend(bad)
    if not good:
        return good, bad, Batch.empty(bad)
    return good, bad, None


Collate = Callable[[list[Any]], Any]


@attrs.define
class Collator:
    """Pads a list of items into a :class:`Batch`. ``padding_side="left"`` for generation.
    ``collate[m]``: how modality ``m``'s preprocessed inputs are batched (the encoder's ``collate``;
    ``torch.stack`` when not given)."""

    pad_id: int
    padding_side: str = "right"
    collate: dict[str, Collate] = attrs.field(factory=dict)
    skipped: list[Skipped] = attrs.field(factory=list)
    #: append skipped items to ``skipped`` here (``False`` when :class:`Batches` counts them)
    record_skipped: bool = True
    #: frozen CPU encoders: inputs the feature cache lacks are encoded here, in the loader worker
    #: (off the training step), and :class:`Batches` stores them (:func:`encode_pending`)
    encoders: dict[str, Any] | None = None

    def __call__(self, items: Sequence[dict[str, Any] | Skipped]) -> Batch:
        good, bad, empty = separate_skipped(items, self)
        if empty is not None:
            return empty
        longest = max(len(item["input_ids"]) for item in good)
        ids = torch.full((len(good), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(good), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(good), longest), dtype=torch.long)
        for row, item in enumerate(good):
            n = len(item["input_ids"])
            cols = slice(longest - n, longest) if self.padding_side == "left" else slice(0, n)
            ids[row, cols] = torch.tensor(item["input_ids"])
            labels[row, cols] = torch.tensor(item["labels"])
            mask[row, cols] = 1
        inputs, features, pending = collate_modalities(good, self.collate)
        batch = Batch(ids, labels, mask, ids=[item["id"] for item in good],
                      modalities=tuple(tuple(item.get("modalities", ())) for item in good),
                      inputs=inputs, features=features, pending=pending, num_tokens=int(mask.sum()),
                      num_slots=mask.numel(), skipped=len(items) - len(good), skipped_items=bad)
        if pending and self.encoders is not None:
            batch.fresh = encode_pending(batch, self.encoders)
        return batch


def collate_modalities(items: Sequence[dict[str, Any]], collate: Mapping[str, Collate] | None = None
                       ) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]:
    """``(inputs, features, pending)`` of a batch, items in batch order (each in placeholder order):
    ``inputs[m]`` modality ``m``'s preprocessed inputs, collated; with a feature cache,
    ``features[m]`` the cached features joined (:func:`join_features`), or, when some were not
    cached, a list with ``None`` at those places plus ``pending[m] = (places, inputs, cache keys)``
    for :class:`Batches` to encode."""
    collate = collate or {}
    if not any("features" in item for item in items):
        gathered: dict[str, list[Any]] = {}
        for item in items:
            for modality, values in item["inputs"].items():
                gathered.setdefault(modality, []).extend(values)
        return {m: collate.get(m, _stack)(v) for m, v in gathered.items()}, None, None
    features: dict[str, list[Any]] = {}
    pending: dict[str, tuple[list[int], list[Any], list[str | None]]] = {}
    for item in items:
        for modality, feats in item["features"].items():
            raws = iter(item["inputs"].get(modality, []))
            keys = iter(item["cache_keys"].get(modality, []))
            column = features.setdefault(modality, [])
            for feat in feats:
                if feat is None:
                    places, values, entry_keys = pending.setdefault(modality, ([], [], []))
                    places.append(len(column))
                    values.append(next(raws))
                    entry_keys.append(next(keys))
                column.append(feat)
    joined = {m: f if m in pending else join_features(f) for m, f in features.items()}
    return {}, joined, pending or None


def _stack(values: list[Any]) -> torch.Tensor:
    return torch.stack(values)


def join_features(column: Sequence[Any], device: Any = None, dtype: torch.dtype | None = None) -> Any:
    """Per-input cached features -> one modality's batch features: ``[T, dim]`` tensors stack into
    ``Tensor[K, T, dim]``; single-input :class:`RaggedFeatures` (a variable-size modality) join into
    one ``RaggedFeatures``."""
    if column and isinstance(column[0], RaggedFeatures):
        return RaggedFeatures.from_list([f.values.to(device=device, dtype=dtype) for f in column],
                                        [f.separators for f in column])
    if device is None and dtype is None:
        return torch.stack(list(column))
    return torch.stack([f.to(device=device, dtype=dtype) for f in column])


def model_inputs(batch: Batch, device: Any) -> dict[str, Any]:
    """The keyword arguments of :meth:`MultimodalLM.forward` (and the DeepSpeed engine) for a batch
    on ``device``."""
    return batch.to(device).model_kwargs()


class Batches:
    """What the training loop iterates: the data loader's batches, finished in the main process.

    - a record that failed to load without ``--skip-bad-records`` raises its :class:`DataError`
      (file, record, id, reason) here, also when a data-loader worker met it;
    - skipped records are counted into ``collator.skipped`` when the batch is handed out;
    - with a feature cache, inputs whose entry was missing or failed its check are encoded with the
      frozen encoder and written back (:meth:`complete`);
    - ``prefetch`` > 0 reads that many batches ahead in a background thread (for a loader without
      worker processes: the cache reads then overlap the training step).

    ``dataset``, ``collate_fn`` and ``generator`` are the loader's (the loop builds a stand-in batch
    from them and reseeds workers per epoch).
    """

    def __init__(self, loader: Any, collator: Any, *, cache: Any = None, encoders: Mapping[str, Any] | None = None,
                 prefetch: int = 0, recompute_error: str | None = None):
        self.loader = loader
        self.collator = collator
        self.cache = cache
        self.encoders = dict(encoders or {})
        self.prefetch = prefetch
        self.recompute_error = recompute_error  # set when encoding in the loop is unsafe (ZeRO-3)
        self.recomputed = 0

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    @property
    def collate_fn(self) -> Any:
        return self.loader.collate_fn

    @property
    def generator(self) -> Any:
        return getattr(self.loader, "generator", None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        source = iter(self.loader) if self.prefetch <= 0 else _background(self.loader, self.prefetch)
        try:
            for batch in source:
                yield self.finish(batch)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
            if self.cache is not None:
                self.cache.flush()  # features recomputed during the pass

    def finish(self, batch: Batch) -> Batch:
        skipped, batch.skipped_items = batch.skipped_items, []
        for item in skipped:
            if item.error is not None:
                raise item.error
        self.collator.skipped.extend(skipped)
        if batch.pending:
            self.complete(batch)
        fresh, batch.fresh = batch.fresh, None
        for modality, key, feat in fresh or ():  # encoded by the loader worker
            self.cache.put(modality, key, feat)
            self.recomputed += 1
        return batch

    def complete(self, batch: Batch) -> None:
        """Encode the inputs the cache could not serve, store their features and fill them in."""
        if self.recompute_error is not None:
            modality, (places, _, _) = next(iter(batch.pending.items()))
            raise DataError("feature cache", None, f"{len(places)} {modality} input(s) of records "
                            f"{', '.join(map(str, batch.ids[:8]))} have no usable cache entry "
                            f"({self.recompute_error})")
        for modality, key, feat in encode_pending(batch, self.encoders):
            self.cache.put(modality, key, feat)
            self.recomputed += 1


def encode_pending(batch: Batch, encoders: Mapping[str, Any]) -> list[tuple[str, str, Any]]:
    """Encode the inputs of ``batch`` the feature cache could not serve (``batch.pending``) with the
    frozen encoders and fill them into ``batch.features``; returns ``(modality, key, features)`` of
    each input with a cache key, for the cache."""
    pending, batch.pending = batch.pending or {}, None
    out = []
    for modality, (places, values, keys) in pending.items():
        encoded = split_features(encode_frozen(encoders[modality], values))
        column = batch.features[modality]
        for place, key, feat in zip(places, keys, encoded, strict=True):
            column[place] = feat
            if key is not None:
                out.append((modality, key, feat))
        first = encoded[0].values if isinstance(encoded[0], RaggedFeatures) else encoded[0]
        batch.features[modality] = join_features(column, first.device, first.dtype)
    return out


def _background(iterable: Any, depth: int):
    """Iterate ``iterable`` in a daemon thread, ``depth`` items ahead; errors re-raise here."""
    import queue
    import threading

    box: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        box.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            box.put((done, None))
        except BaseException as exc:  # handed to the consumer
            box.put((done, exc))

    thread = threading.Thread(target=produce, name="mmkit-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = box.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting to put
            try:
                box.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def in_batch(exc: Exception, batch: Batch) -> Exception:
    """An encoder fault (:class:`~mmkit.errors.PluginError` from ``ModalityEncoder.__call__``) with
    the records of the batch it happened in, so the user can find and check their files."""
    from mmkit.errors import PluginError

    ids = [str(i) for i in batch.ids]
    if not ids:
        return exc
    shown = ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
    return PluginError(f"{exc} (in the batch of records {shown})")

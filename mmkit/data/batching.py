"""Turn samples into model inputs: load and preprocess each input file, tokenise through the prompt
builder, and pad into batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from mmkit.records import Sample
from mmkit.errors import DataError, InputError
from mmkit.modeling.lora import route_for_sample
from mmkit.prompt import IGNORE_INDEX, EncodedSample, PromptBuilder


@attrs.frozen
class Skipped:
    """A sample left out under ``--skip-bad-records``, and why. With ``error`` set, the record's
    failure must stop the run: the dataset defers it (a data-loader worker cannot raise it intact)
    and :class:`Batches` raises it in the main process."""

    where: str
    reason: str
    error: DataError | None = attrs.field(default=None, eq=False)


Preprocess = Callable[[Path], torch.Tensor]


class SampleDataset(torch.utils.data.Dataset):
    """Samples -> ``{"input_ids", "labels", "inputs", "adapter", "id"}`` items.

    With a feature ``cache`` (:class:`mmkit.data.feature_cache.FeatureCache`), items also carry
    ``features[m]``: one cached feature tensor per input, or ``None`` where the cache had no good
    entry, in which case ``inputs[m]`` holds those inputs preprocessed and ``cache_keys[m]`` their keys.
    ``defer_errors``: a failing record becomes a :class:`Skipped` carrying its error (raised by
    :class:`Batches` in the main process) instead of raising here.
    """

    def __init__(self, samples: Sequence[Sample], prompts: PromptBuilder, preprocess: Mapping[str, Preprocess],
                 adapters: Sequence[str], *, skip_bad_records: bool = False, cache: Any = None,
                 defer_errors: bool = False):
        self.samples = list(samples)
        self.prompts = prompts
        self.preprocess = dict(preprocess)
        self.adapters = list(adapters)
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
        encoded = encoded or self.prompts.encode_sample(sample)
        inputs: dict[str, list[torch.Tensor]] = {}
        features: dict[str, list[torch.Tensor | None]] = {}
        keys: dict[str, list[str | None]] = {}
        for modality, paths in sample.inputs.items():
            if modality not in self.preprocess:
                raise DataError(sample.source, sample.index, f"has {modality} input but the model has no {modality} modality")
            if self.cache is None:
                inputs[modality] = [self.preprocess[modality](Path(p)) for p in paths]
                continue
            features[modality] = []
            for p in paths:
                try:
                    feat, key = self.cache.lookup(modality, p)
                except OSError:  # missing or unreadable: preprocessing names the problem
                    feat, key = None, None
                if feat is None:
                    inputs.setdefault(modality, []).append(self.preprocess[modality](Path(p)))
                    keys.setdefault(modality, []).append(key)
                features[modality].append(feat)
        item = {
            "id": sample.id,
            "input_ids": encoded.input_ids,
            "labels": encoded.labels,
            "inputs": inputs,
            "adapter": route_for_sample(sample.modalities, self.adapters),
        }
        if self.cache is not None:
            item["features"] = features
            item["cache_keys"] = keys
        return item


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


def make_preprocessor(load: Callable[[Path], Any], preprocess: Callable[[Any], torch.Tensor], *,
                      modality: str | None = None, plugin: str | None = None) -> Preprocess:
    """``path -> tensor``: the modality's ``load`` then its encoder's ``preprocess``. Whatever either
    raises becomes an :class:`InputError` naming the file, the plugin and the modality in one line
    (the dataset adds the record), so ``--skip-bad-records`` skips it like a bad file. ``modality``
    and ``plugin`` default to what the factory stamped on the encoder."""
    encoder = getattr(preprocess, "__self__", None)
    origin = dict(getattr(encoder, "_mmkit_origin", None) or {})
    modality = modality or origin.get("modality")
    plugin = plugin or origin.get("plugin") or getattr(load, "__module__", "?").split(".")[0]
    shape = tuple(getattr(encoder, "input_shape", ()) or ()) or None
    who = f"plugin {plugin}" + (f", modality {modality}" if modality else "")

    def run(path: Path) -> torch.Tensor:
        raw = _call(load, path, path, f"{who}: load")
        tensor = _call(preprocess, raw, path, f"{who}: preprocess")
        if not isinstance(tensor, torch.Tensor):
            raise InputError(path, f"{who}: preprocess returned a {type(tensor).__name__}, declared a tensor "
                                   f"of shape {list(shape or ())}")
        if shape is not None and tuple(tensor.shape) != shape:
            raise InputError(path, f"{who}: preprocess returned shape {list(tensor.shape)}, the encoder declares "
                                   f"input_shape {list(shape)}")
        if not bool(torch.isfinite(tensor).all()):
            raise InputError(path, f"{who}: preprocessing produced NaN or inf values")
        return tensor

    return run


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
                     ) -> tuple[list[dict[str, Any]], list[Skipped], dict[str, Any] | None]:
    """The usable items, the skipped ones, and the batch to return instead when none is usable.
    Skipped items are kept on ``collator.skipped`` when the collator records them itself."""
    good, bad = [], []
    for item in items:
        (bad if isinstance(item, Skipped) else good).append(item)
    if collator.record_skipped:
        collator.skipped.extend(bad)
    if not good:
        return good, bad, {"empty": True, "skipped": len(items), "skipped_items": bad}
    return good, bad, None


@attrs.define
class Collator:
    """Pads a list of items into a batch. ``padding_side="left"`` for generation."""

    pad_id: int
    padding_side: str = "right"
    skipped: list[Skipped] = attrs.field(factory=list)
    #: append skipped items to ``skipped`` here (``False`` when :class:`Batches` counts them)
    record_skipped: bool = True

    def __call__(self, items: Sequence[dict[str, Any] | Skipped]) -> dict[str, Any]:
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
        real = int(mask.sum())
        batch = {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": mask,
            "adapters": [item["adapter"] for item in good],
            "ids": [item["id"] for item in good],
            "num_tokens": real,
            "padding_fraction": 1.0 - real / mask.numel(),
            "skipped": len(items) - len(good),
            "skipped_items": bad,
        }
        batch.update(stack_modalities(good))
        return batch


def stack_modalities(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The modality part of a batch, items in batch order (each in placeholder order):
    ``inputs[m]`` stacked preprocessed inputs; with a feature cache, ``features[m]`` stacked cached
    features, or, when some were not cached, a list with ``None`` at those places plus
    ``recompute[m] = (places, their stacked inputs, their cache keys)`` for :class:`Batches`."""
    if not any("features" in item for item in items):
        inputs: dict[str, list[torch.Tensor]] = {}
        for item in items:
            for modality, tensors in item["inputs"].items():
                inputs.setdefault(modality, []).extend(tensors)
        return {"inputs": {m: torch.stack(t) for m, t in inputs.items()}}
    features: dict[str, list[torch.Tensor | None]] = {}
    pending: dict[str, tuple[list[int], list[torch.Tensor], list[str | None]]] = {}
    for item in items:
        for modality, feats in item["features"].items():
            raws = iter(item["inputs"].get(modality, []))
            keys = iter(item["cache_keys"].get(modality, []))
            column = features.setdefault(modality, [])
            for feat in feats:
                if feat is None:
                    places, tensors, entry_keys = pending.setdefault(modality, ([], [], []))
                    places.append(len(column))
                    tensors.append(next(raws))
                    entry_keys.append(next(keys))
                column.append(feat)
    out: dict[str, Any] = {"inputs": {}, "features": {m: f if m in pending else torch.stack(f)
                                                      for m, f in features.items()}}
    if pending:
        out["recompute"] = {m: (places, torch.stack(tensors), keys) for m, (places, tensors, keys) in pending.items()}
    return out


def model_inputs(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """The keyword arguments of :meth:`MultimodalLM.forward` (and the DeepSpeed engine) for a batch:
    packed batches add ``position_ids`` and ``segment_ids``, cached ones ``features``."""
    out = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
           "labels": batch["labels"].to(device), "inputs": {m: t.to(device) for m, t in batch["inputs"].items()},
           "adapters": batch["adapters"]}
    for key in ("position_ids", "segment_ids"):
        if key in batch:
            out[key] = batch[key].to(device)
    if "features" in batch:
        out["features"] = {m: t.to(device, non_blocking=True) for m, t in batch["features"].items()}
    return out


class Batches:
    """What the training loop iterates: the data loader's batches, finished in the main process.

    - a record that failed to load without ``--skip-bad-records`` raises its :class:`DataError`
      (file, record, id, reason) here, also when a data-loader worker met it;
    - skipped records are counted into ``collator.skipped`` when the batch is handed out;
    - with a feature cache, inputs whose entry was missing or failed its check are encoded with the
      frozen encoder and written back (:meth:`complete`);
    - ``prefetch`` > 0 reads that many batches ahead in a background thread (for a loader without
      worker processes: the cache reads then overlap the training step).

    Other attributes (``dataset``, ``collate_fn``, ``batch_sampler``, ...) are the loader's.
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

    def __getattr__(self, name: str) -> Any:
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

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

    def finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        skipped = batch.pop("skipped_items", [])
        for item in skipped:
            if item.error is not None:
                raise item.error
        self.collator.skipped.extend(skipped)
        if "recompute" in batch:
            self.complete(batch)
        return batch

    def complete(self, batch: dict[str, Any]) -> None:
        """Encode the inputs the cache could not serve, store their features and fill them in."""
        from mmkit.data.feature_cache import encode_frozen

        for modality, (places, tensors, keys) in batch.pop("recompute").items():
            if self.recompute_error is not None:
                raise DataError("feature cache", None, f"{len(places)} {modality} input(s) of records "
                                f"{', '.join(map(str, batch['ids'][:8]))} have no usable cache entry "
                                f"({self.recompute_error})")
            encoded = encode_frozen(self.encoders[modality], tensors)
            column = batch["features"][modality]
            for place, key, feat in zip(places, keys, encoded, strict=True):
                column[place] = feat
                if key is not None:
                    self.cache.put(modality, key, feat)
            batch["features"][modality] = torch.stack([f.to(encoded.device, encoded.dtype) for f in column])
            self.recomputed += len(places)


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


def in_batch(exc: Exception, batch: Mapping[str, Any]) -> Exception:
    """An encoder fault (:class:`~mmkit.errors.PluginError` from ``ModalityEncoder.__call__``) with
    the records of the batch it happened in, so the user can find and check their files."""
    from mmkit.errors import PluginError

    ids = [str(i) for i in batch.get("ids", [])]
    if not ids:
        return exc
    shown = ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
    return PluginError(f"{exc} (in the batch of records {shown})")

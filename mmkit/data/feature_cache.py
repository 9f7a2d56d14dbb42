"""A versioned cache of frozen-encoder features (``--cache-features DIR``).

Each input file is encoded once. Its features are stored under a key that hashes the file's bytes
together with a *namespace*: the modality, the encoder's ``identity()`` (class, weights hash,
configuration, preprocessing), the modality's loader and plugin version, and the stored dtype. A
changed encoder, preprocessing or plugin therefore lands in another namespace and never reads
stale features.

Layout::

    DIR/<modality>-<namespace[:16]>/identity.json          what the namespace stands for (for people)
    DIR/<modality>-<namespace[:16]>/shard-<host>-<pid>-<uuid>.safetensors

A shard is a safetensors file of up to a few hundred entries (tensor name = entry key) whose
metadata holds each entry's CRC-32. Shards are written under a temporary name and renamed into
place, with names unique per writer, so any number of processes (ranks, or runs) can fill one
cache at once; a reader only ever sees whole shards. Every read checks the entry's checksum,
shape and dtype; an unreadable shard is set aside (renamed ``*.corrupt``) and a bad entry is
recomputed and written again (the newest shard holding a key is read first).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import torch

from mmkit.modeling.features import RaggedFeatures, move

FORMAT = "mmkit-feature-cache/1"
#: suffix of the tensor holding an entry's separator rows (variable-size modalities that mark layout rows)
_SEPARATORS = ".separators"
SHARD_GLOB = "shard-*.safetensors"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def content_hash(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    if os.path.isdir(path):
        # A folder input (e.g. numbered frames): every file's relative name and content, in name order,
        # so renaming, adding, removing or changing any of them changes the key.
        root = Path(path)
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(file.relative_to(root).as_posix().encode() + b"\0" + content_hash(file).encode())
        return digest.hexdigest()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def namespace_of(description: Mapping[str, Any]) -> str:
    """The namespace hash of a description (encoder identity, modality, loader, dtype, ...)."""
    payload = json.dumps(description, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def entry_key(namespace: str, content: str) -> str:
    return hashlib.sha256(f"{namespace}:{content}".encode()).hexdigest()


def checksum(tensor: torch.Tensor) -> str:
    raw = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return f"{zlib.crc32(raw) & 0xFFFFFFFF:08x}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class FeatureStore:
    """One namespace of the cache: the features of one modality under one encoder identity."""

    def __init__(self, root: str | Path, *, prefix: str, description: Mapping[str, Any], shape: Sequence[int],
                 dtype: str = "float32", shard_entries: int = 256, shard_bytes: int = 256 << 20):
        if dtype not in _DTYPES:
            raise ValueError(f"feature dtype {dtype!r}: use {', '.join(_DTYPES)}")
        self.description = {**description, "dtype": dtype, "shape": list(shape), "format": FORMAT}
        self.namespace = namespace_of(self.description)
        self.directory = Path(root) / f"{prefix}-{self.namespace[:16]}"
        self.shape = tuple(shape)  # (None, dim): a variable-size modality, one [n_i, dim] entry per input
        self.variable = self.shape[0] is None
        self.dtype = _DTYPES[dtype]
        self.shard_entries, self.shard_bytes = shard_entries, shard_bytes
        self.index: dict[str, list[str]] = {}  # key -> shard files holding it, newest first
        self.quarantined: list[str] = []
        self.bad_entries = 0  # entries that failed their check on read in this process
        self._handles: OrderedDict[str, Any] = OrderedDict()
        self._pid = os.getpid()
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0

    # -- setup ---------------------------------------------------------------------------------
    def open(self) -> FeatureStore:
        self.directory.mkdir(parents=True, exist_ok=True)
        ident = self.directory / "identity.json"
        if not ident.is_file():
            tmp = self.directory / f".identity.{uuid.uuid4().hex}.tmp"
            tmp.write_text(json.dumps({"namespace": self.namespace, **self.description}, indent=2, sort_keys=True,
                                      default=str))
            os.replace(tmp, ident)
        self.refresh()
        return self

    def refresh(self) -> None:
        """Re-read which shards hold which keys (after other processes wrote)."""
        from safetensors import safe_open

        listed = []
        for shard in self.directory.glob(SHARD_GLOB):
            try:
                listed.append((shard.stat().st_mtime_ns, shard.name, shard))
            except FileNotFoundError:  # set aside by another process since the listing
                continue
        index: dict[str, list[str]] = {}
        for *_, shard in sorted(listed, reverse=True):
            try:
                with safe_open(str(shard), framework="pt") as fh:
                    keys = list(fh.keys())
                    meta = fh.metadata() or {}
                if meta.get("format") != FORMAT or meta.get("namespace") != self.namespace:
                    raise ValueError("not a shard of this namespace")
                json.loads(meta["checksums"])
            except OSError:  # cannot open it (permissions, too many open files, gone): not corrupt, leave it
                continue
            except Exception:  # unreadable header, truncated file, foreign file: set it aside
                self._quarantine(shard)
                continue
            for key in keys:
                if not key.endswith(_SEPARATORS):
                    index.setdefault(key, []).append(str(shard))
        self.index = index
        self._handles.clear()

    def _quarantine(self, shard: Path) -> None:
        try:
            os.replace(shard, shard.with_name(shard.name + f".{uuid.uuid4().hex[:8]}.corrupt"))
        except OSError:
            return  # another process moved it first (and counts it)
        self.quarantined.append(str(shard))

    def __getstate__(self) -> dict[str, Any]:  # data-loader workers: no open files, no unsaved entries
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()
        state["_pending"] = {}
        state["_pending_bytes"] = 0
        return state

    # -- reading --------------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self.index

    def _handle(self, shard: str) -> tuple[Any, dict[str, str]]:
        from safetensors import safe_open

        if self._pid != os.getpid():  # forked: handles belong to the parent
            self._handles.clear()
            self._pid = os.getpid()
        entry = self._handles.get(shard)
        if entry is None:
            fh = safe_open(shard, framework="pt")
            entry = (fh, json.loads((fh.metadata() or {})["checksums"]))
            self._handles[shard] = entry
            if len(self._handles) > 64:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(shard)
        return entry

    def _fits(self, tensor: torch.Tensor) -> bool:
        if self.variable:
            return tensor.dim() == 2 and tensor.shape[1] == self.shape[1]
        return tuple(tensor.shape) == self.shape

    def get(self, key: str) -> torch.Tensor | RaggedFeatures | None:
        """The entry's features, checked; ``None`` when absent or when every copy is bad. A variable-
        size modality's entry is a one-input :class:`RaggedFeatures` (with its separator rows)."""
        for shard in self.index.get(key, ()):
            try:
                fh, sums = self._handle(shard)
                tensor = fh.get_tensor(key)
                good = tensor.dtype == self.dtype and self._fits(tensor) and sums.get(key) == checksum(tensor)
                seps = None
                if good and self.variable and f"{key}{_SEPARATORS}" in sums:
                    seps = fh.get_tensor(f"{key}{_SEPARATORS}")
                    good = (sums[f"{key}{_SEPARATORS}"] == checksum(seps)
                            and tuple(seps.shape) == (tensor.shape[0],))
                    seps = seps.bool()
            except Exception:
                good = False
            if good:
                return RaggedFeatures(tensor, (tensor.shape[0],), seps) if self.variable else tensor
            self.bad_entries += 1
        return None

    # -- writing --------------------------------------------------------------------------------
    def put(self, key: str, features: torch.Tensor | RaggedFeatures) -> None:
        """Store one input's features: ``[T, dim]`` (fixed size) or a one-input
        :class:`RaggedFeatures` / ``[n, dim]`` tensor (variable size; separators kept beside it)."""
        seps = None
        if isinstance(features, RaggedFeatures):
            features, seps = features.values, features.separators
        tensor = features.detach().to("cpu", self.dtype).contiguous()
        if not self._fits(tensor):
            raise ValueError(f"features of shape {tuple(tensor.shape)} for a cache of shape {self.shape}")
        self._pending[key] = tensor
        self._pending_bytes += tensor.numel() * tensor.element_size()
        if seps is not None:
            self._pending[f"{key}{_SEPARATORS}"] = seps.detach().to("cpu", torch.uint8).contiguous()
        if len(self._pending) >= self.shard_entries or self._pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> Path | None:
        """Write the pending entries as one shard (atomically) and index it."""
        from safetensors.torch import save_file

        if not self._pending:
            return None
        name = f"shard-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}.safetensors"
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        meta = {"format": FORMAT, "namespace": self.namespace,
                "checksums": json.dumps({k: checksum(t) for k, t in self._pending.items()})}
        try:
            save_file(self._pending, str(tmp), metadata=meta)
            from mmkit.atomic import default_mode

            os.chmod(tmp, default_mode())  # safetensors writes 0600; a shared cache is read by the group
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except OSError as exc:  # a full disk, a folder this user may not write
            from mmkit.errors import ConfigError

            raise ConfigError(f"feature cache {self.directory}: cannot write a shard ({exc.strerror or exc}); "
                              "free space or give --cache-features a folder you can write") from exc
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.directory)
        for key in self._pending:
            if not key.endswith(_SEPARATORS):
                self.index.setdefault(key, []).insert(0, str(final))
        self._pending, self._pending_bytes = {}, 0
        return final


@attrs.define
class FillStats:
    inputs: int = 0  # distinct input files
    reused: int = 0  # already cached (and checked)
    encoded: int = 0  # encoded by this process
    recomputed: int = 0  # of those, entries that were in the cache but failed their check
    quarantined: int = 0  # unreadable shards set aside
    failed: list[tuple[str, str]] = attrs.field(factory=list)  # (path, reason): inputs that failed to load


class FeatureCache:
    """The cache for one model: a :class:`FeatureStore` per modality and each input's entry key."""

    def __init__(self, root: str | Path, stores: Mapping[str, FeatureStore]):
        self.root = Path(root)
        self.stores = dict(stores)
        self.keys: dict[tuple[str, str], str] = {}  # (modality, path) -> entry key

    @classmethod
    def for_model(cls, root: str | Path, encoders: Mapping[str, Any], *, descriptions: Mapping[str, Mapping[str, Any]],
                  dtype: str = "float32") -> FeatureCache:
        """``descriptions[m]`` must hold everything that changes modality ``m``'s features besides the
        encoder's ``identity()`` (which is added here): the loader, the plugin and its version."""
        stores = {}
        for modality, encoder in encoders.items():
            description = {"modality": modality, "encoder": encoder.identity(), **descriptions.get(modality, {})}
            # a variable-size encoder (num_tokens None): one [n_i, dim] entry per input
            stores[modality] = FeatureStore(root, prefix=modality, description=description,
                                            shape=(encoder.num_tokens, encoder.output_dim), dtype=dtype).open()
        return cls(root, stores)

    # -- keys -----------------------------------------------------------------------------------
    def key_for(self, modality: str, path: str) -> str:
        key = self.keys.get((modality, path))
        if key is None:
            key = entry_key(self.stores[modality].namespace, content_hash(path))
            self.keys[(modality, path)] = key
        return key

    def compute_keys(self, items: Iterable[tuple[str, str]], workers: int = 4) -> dict[tuple[str, str], str | None]:
        """Entry keys of many inputs (file hashing in threads); ``None`` for unreadable files."""
        todo = [item for item in dict.fromkeys(items) if item not in self.keys]

        def one(item: tuple[str, str]) -> tuple[tuple[str, str], str | None]:
            try:
                return item, entry_key(self.stores[item[0]].namespace, content_hash(item[1]))
            except OSError:
                return item, None

        with ThreadPoolExecutor(max(1, workers)) as pool:
            for item, key in pool.map(one, todo):
                if key is not None:
                    self.keys[item] = key
        return {item: self.keys.get(item) for item in items}

    # -- reading and writing --------------------------------------------------------------------
    def lookup(self, modality: str, path: str) -> tuple[torch.Tensor | RaggedFeatures | None, str]:
        """``(features or None, entry key)`` for one input."""
        key = self.key_for(modality, path)
        return self.stores[modality].get(key), key

    def put(self, modality: str, key: str, features: torch.Tensor | RaggedFeatures) -> None:
        self.stores[modality].put(key, features)

    def flush(self) -> None:
        for store in self.stores.values():
            store.flush()

    def refresh(self) -> None:
        for store in self.stores.values():
            store.refresh()

    # -- filling --------------------------------------------------------------------------------
    def fill(self, inputs: Iterable[tuple[str, str]], *, encoders: Mapping[str, Any],
             preprocess: Mapping[str, Callable[[Path], torch.Tensor]], device: Any = "cpu", batch_size: int = 32,
             num_workers: int = 0, rank: int = 0, world: int = 1, barrier: Callable[[], None] | None = None,
             progress: Callable[[int, int], None] | None = None) -> FillStats:
        """Encode every input not yet cached (or whose entry fails its check) and store it.

        With several processes, each encodes the missing inputs whose key falls to its rank; after
        ``barrier()`` every process re-reads the index. Inputs that fail to load are reported in
        ``stats.failed`` and left out (training reports them against their records).
        """
        items = list(dict.fromkeys(inputs))
        stats = FillStats(inputs=len(items))
        keys = self.compute_keys(items)
        missing: list[tuple[str, str, str]] = []
        for (modality, path), key in keys.items():
            if key is None:
                stats.failed.append((path, "file not found or unreadable"))
                continue
            store = self.stores[modality]
            if int(key[:8], 16) % world != rank:
                continue  # another process checks (and if needed encodes) this one
            if key in store:
                if store.get(key) is not None:
                    stats.reused += 1
                    continue
                stats.recomputed += 1
            missing.append((modality, path, key))
        done = 0
        by_modality: dict[str, list[tuple[str, str]]] = {}
        for modality, path, key in missing:
            by_modality.setdefault(modality, []).append((path, key))
        for modality, todo in by_modality.items():
            encoder = encoders[modality]
            dataset = _Preprocessed(todo, preprocess[modality])
            # its own generator: a loader draws its base seed from torch's global one otherwise, and a
            # run that fills the cache would then train with other dropout than one that finds it full
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                                 collate_fn=_collate_preprocessed, generator=torch.Generator())
            for items, batch_keys, failures in loader:
                stats.failed.extend(failures)
                if items:
                    features = split_features(encode_frozen(encoder, items, device))
                    for key, feat in zip(batch_keys, features, strict=True):
                        self.put(modality, key, feat)
                    stats.encoded += len(batch_keys)
                done += len(batch_keys) + len(failures)
                if progress is not None:
                    progress(done, len(missing))
        self.flush()
        if barrier is not None:
            barrier()
        self.refresh()
        stats.quarantined = sum(len(s.quarantined) for s in self.stores.values())
        return stats


def encode_frozen(encoder: Any, items: Sequence[Any], device: Any = None) -> torch.Tensor | RaggedFeatures:
    """A frozen encoder's features for preprocessed inputs (collated by the encoder's ``collate``;
    no gradients): ``Tensor[K, T, dim]`` or :class:`RaggedFeatures` whose counts are checked
    against ``num_tokens_for`` (the slots the prompt reserved)."""
    batch = encoder.collate(list(items)) if hasattr(encoder, "collate") else torch.stack(list(items))
    param = next(encoder.parameters(), None)
    if param is not None:
        batch = move(batch, param.device, param.dtype)
    elif device is not None:
        batch = move(batch, device)
    with torch.no_grad():
        if getattr(encoder, "num_tokens", 0) is None:
            return encoder(batch, counts=[encoder.num_tokens_for(item) for item in items])
        return encoder(batch)


def split_features(features: Any) -> list[Any]:
    """One entry per input of a batch's encoder features (what the feature cache stores per input):
    ``[T, dim]`` rows of a fixed-size encoder's tensor, single-input :class:`RaggedFeatures` of a
    variable-size one."""
    if isinstance(features, RaggedFeatures):
        return [RaggedFeatures(v, (v.shape[0],), s)
                for v, s in zip(features.split(), features.split_separators(), strict=True)]
    return list(features)


class _Preprocessed(torch.utils.data.Dataset):
    def __init__(self, todo: Sequence[tuple[str, str]], preprocess: Callable[[Path], torch.Tensor]):
        self.todo = list(todo)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, str, str, str | None]:
        path, key = self.todo[index]
        try:
            return self.preprocess(Path(path)), key, path, None
        except Exception as exc:  # reported against the records using it when training reads it
            from mmkit.errors import MmkitError

            return None, key, path, str(exc) if isinstance(exc, MmkitError) else f"{type(exc).__name__}: {exc}"


def _collate_preprocessed(items: Sequence[tuple[Any, str, str, str | None]]):
    """The good inputs (collated by the encoder in the main process), their keys, and the failures."""
    good = [(t, k) for t, k, _, err in items if err is None]
    failures = [(p, err) for _, _, p, err in items if err is not None]
    return [t for t, _ in good], [k for _, k in good], failures


# -- training -------------------------------------------------------------------------------------
_PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _ref_name(ref: Any) -> str:
    return ref if isinstance(ref, str) else f"{getattr(ref, '__module__', '?')}:{getattr(ref, '__qualname__', ref)}"


def plugin_descriptions(host: Any, modalities: Iterable[str]) -> dict[str, dict[str, Any]]:
    """What besides the encoder changes each modality's features: its loader, and the plugin
    (with its version) that provides them."""
    out = {}
    for modality in modalities:
        plugin = host.provider("modality", modality)
        record = host.records.get(plugin)
        out[modality] = {"load": _ref_name(host.modality(modality).load), "plugin": plugin,
                         "plugin_version": getattr(record, "version", None)}
    return out


def open_training_cache(root: str | Path, *, host: Any, encoders: Mapping[str, Any], samples: Sequence[Any],
                        preprocess: Mapping[str, Callable[[Path], torch.Tensor]], precision: str = "fp32",
                        device: Any = "cpu", batch_size: int = 32, num_workers: int = 0, rank: int = 0,
                        world: int = 1, barrier: Callable[[], None] | None = None,
                        gather: Callable[[Any], list[Any]] | None = None, console: Any = None,
                        strict: bool = False, fill: bool = True) -> FeatureCache:
    """The cache a training run reads: opened for the model's encoders and filled with every input
    of ``samples`` before training starts (encoders frozen, nothing partitioned yet). ``strict``:
    an input that fails to load raises :class:`DataError` naming its first record, on every process
    (``gather``: all-gather of a picklable object over the processes); otherwise training meets it
    and skips its records. ``fill=False``: only opened; the loader workers encode what it lacks
    during the first epoch (:attr:`mmkit.data.batching.Collator.encoders`)."""
    cache = FeatureCache.for_model(root, encoders, descriptions=plugin_descriptions(host, encoders),
                                   dtype=_PRECISION_DTYPES[precision])
    if not fill:
        return cache
    inputs = [(m, p) for s in samples for m, paths in s.inputs.items() if m in encoders for p in paths]
    for encoder in encoders.values():
        encoder.to(device)
    progress = None
    if console is not None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("[bold]caching features"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                       TimeElapsedColumn(), console=console, transient=True)
        task = None

        def progress(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                bar.start()
                task = bar.add_task("cache", total=total)
            bar.update(task, completed=done, total=total)
    try:
        stats = cache.fill(inputs, encoders=encoders, preprocess=preprocess, device=device, batch_size=batch_size,
                           num_workers=num_workers, rank=rank, world=world, barrier=barrier, progress=progress)
    finally:
        if console is not None:
            bar.stop()
    reused, encoded, recomputed, failed = stats.reused, stats.encoded, stats.recomputed, stats.failed
    if gather is not None and world > 1:  # every process checked and encoded its share
        parts = gather((stats.reused, stats.encoded, stats.recomputed, stats.failed))
        reused, encoded, recomputed = (sum(part[i] for part in parts) for i in range(3))
        failed = [f for part in parts for f in part[3]]
    if console is not None:
        console.print(f"feature cache {root}: {stats.inputs:,} inputs, {reused:,} read from the cache, "
                      f"{encoded:,} encoded now"
                      + (f" ({recomputed:,} bad entries recomputed)" if recomputed else "")
                      + (f", {stats.quarantined} unreadable shard(s) set aside" if stats.quarantined else "")
                      + (f", {len(failed):,} failed to load" if failed else ""))
    if strict and failed:
        from mmkit.errors import DataError

        path, reason = min(failed)
        for sample in samples:
            if any(path in paths for paths in sample.inputs.values()):
                raise DataError(sample.source, sample.index, reason if path in reason else f"{path}: {reason}",
                                record_id=sample.id, kind="corrupt_file")
    return cache

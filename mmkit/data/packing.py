"""Batching strategies beyond pad-to-longest: length- and modality-grouped batches, and multimodal
packing.

- ``grouped`` (:class:`GroupedBatchSampler`): LLaVA's modality-length grouping. Samples are split by
  modality group (:func:`modality_group`: the modalities a sample has, or text-only), shuffled, cut
  into windows of ``micro_batch_size x window`` samples, each window sorted by length and cut into
  micro-batches; the micro-batch order is then shuffled across groups (the biggest first, so an
  out-of-memory shows at step 1).
- ``packed`` (:class:`PackedBatchSampler` + :class:`PackingCollator`): several samples per sequence,
  up to ``max_tokens`` tokens counted with their modality tokens (a variable-size input's own
  count). Rows are filled best-fit-decreasing within windows of shuffled samples of one lead
  modality (:func:`lead_modality`: the model trains a row on one LoRA adapter; with one shared
  adapter, ``mix_rows``, every sample may share a row). Position ids restart at each sample,
  attention stays inside each sample (a block-diagonal causal mask, or flash-attention's varlen
  path through the position ids), and no label crosses a sample boundary. ``micro_batch_size``
  then counts rows.

Both samplers follow the step geometry of :class:`mmkit.data.sampler.StepSampler` (the
same global steps on any number of processes, ``set_epoch(epoch, start_step)`` for resuming).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from mmkit.data.batch import Batch
from mmkit.data.batching import Skipped, collate_modalities, encode_pending, separate_skipped
from mmkit.data.sampler import StepSampler
from mmkit.prompt import IGNORE_INDEX
from mmkit.records import Sample

def modality_group(sample: Sample) -> str:
    """The key samples are grouped by: their modalities in order (``a``, ``a+b``), or ``text``. A
    group has one lead modality, so a grouped micro-batch never mixes LoRA routes."""
    return "+".join(sample.modalities) or "text"


def sample_lengths(prompts: Any, samples: Sequence[Sample], chunk: int = 1024,
                   input_tokens: Sequence[Mapping[str, Sequence[int]] | None] | None = None) -> list[int]:
    """Token lengths with modality tokens, as ``prompts.encode_sample`` counts them (batched).
    ``input_tokens[i]``: sample ``i``'s token count per input of its variable-size modalities
    (:func:`mmkit.data.batching.count_input_tokens`), so its real length is budgeted."""
    from mmkit.errors import DataError

    out: list[int] = []
    for start in range(0, len(samples), chunk):
        part = samples[start:start + chunk]
        counts = None if input_tokens is None else list(input_tokens[start:start + chunk])
        for result in prompts.encode_samples(part, counts) if counts else prompts.encode_samples(part):
            if isinstance(result, DataError):
                raise result
            out.append(len(result.input_ids))
    return out


def _by_group(groups: Sequence[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for index, key in enumerate(groups):
        out.setdefault(key, []).append(index)
    return dict(sorted(out.items()))


class GroupedBatchSampler(StepSampler):
    """Micro-batches of one modality group and similar lengths; yields lists of dataset indices."""

    def __init__(self, lengths: Sequence[int], groups: Sequence[str], *, micro_batch_size: int, grad_accum: int = 1,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True, window: int = 16):
        if len(lengths) != len(groups):
            raise ValueError("one length and one group per sample")
        super().__init__(len(lengths), micro_batch_size=micro_batch_size, grad_accum=grad_accum, rank=rank,
                         world_size=world_size, seed=seed, shuffle=shuffle)
        self.lengths = list(lengths)
        self.groups = _by_group(groups)
        self.window = max(1, window)

    def plan(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{epoch}:grouped")
        bs = self.micro_batch_size
        span = bs * self.window
        batches: list[list[int]] = []
        for members in self.groups.values():
            order = list(members)
            rng.shuffle(order)
            for start in range(0, len(order), span):
                window = sorted(order[start:start + span], key=lambda i: -self.lengths[i])
                batches += [window[i:i + bs] for i in range(0, len(window), bs)]
        rng.shuffle(batches)
        # the most tokens first (padding included): an out-of-memory shows at the first step
        biggest = max(range(len(batches)), key=lambda b: len(batches[b]) * max(self.lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(biggest))
        return batches


def best_fit_decreasing(indices: Sequence[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of total length <= ``capacity``: longest item first, each into the open bin it fills
    best (the least room left). O(n log n) with a sorted list of free room. Items longer than the
    capacity get a bin of their own."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin), sorted
    for index in sorted(indices, key=lambda i: -lengths[i]):
        size = lengths[index]
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, b = free.pop(at)
            bins[b].append(index)
            if room - size > 0:
                bisect.insort(free, (room - size, b))
        else:
            bins.append([index])
            if capacity - size > 0:
                bisect.insort(free, (capacity - size, len(bins) - 1))
    return bins


class PackedBatchSampler(StepSampler):
    """Micro-batches of ``micro_batch_size`` packed rows of at most ``max_tokens`` tokens; yields
    lists of ``(dataset index, row)`` pairs (see :class:`PackedView`)."""

    def __init__(self, lengths: Sequence[int], groups: Sequence[str], *, max_tokens: int, micro_batch_size: int,
                 grad_accum: int = 1, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 window: int = 16384):
        if len(lengths) != len(groups):
            raise ValueError("one length and one group per sample")
        too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
        if too_long:
            raise ValueError(f"{len(too_long)} sample(s) longer than pack_max_tokens={max_tokens} "
                             f"(the first, sample {too_long[0]}, has {lengths[too_long[0]]} tokens)")
        super().__init__(len(lengths), micro_batch_size=micro_batch_size, grad_accum=grad_accum, rank=rank,
                         world_size=world_size, seed=seed, shuffle=shuffle)
        self.lengths = list(lengths)
        self.groups = _by_group(groups)
        self.max_tokens = max_tokens
        self.window = max(1, window)

    def rows(self, epoch: int) -> list[list[int]]:
        """Every packed row of ``epoch`` (sample indices), in training order."""
        rng = random.Random(f"{self.seed}:{epoch}:packed")
        bins: list[list[int]] = []
        for members in self.groups.values():
            order = list(members)
            rng.shuffle(order)
            for start in range(0, len(order), self.window):
                bins += best_fit_decreasing(order[start:start + self.window], self.lengths, self.max_tokens)
        rng.shuffle(bins)
        for row in bins:  # packing sorted each row by length; keep the samples' order random within a row
            rng.shuffle(row)
        return bins

    def plan(self, epoch: int) -> list[list[tuple[int, int]]]:
        bins = self.rows(epoch)
        rows = self.micro_batch_size
        return [[(i, r) for r, row in enumerate(bins[b:b + rows]) for i in row] for b in range(0, len(bins), rows)]


class PackedView(torch.utils.data.Dataset):
    """The dataset indexed by ``(index, row)``: each item learns the packed row it belongs to."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int] | int) -> Any:
        index, row = key if isinstance(key, tuple) else (key, 0)
        item = self.dataset[index]
        if isinstance(item, dict):
            item["row"] = row
        return item


@attrs.define
class PackingCollator:
    """Concatenates the items of each row (see :class:`PackedBatchSampler`) and pads rows to the
    longest. The :class:`~mmkit.data.batch.Batch` has ``position_ids`` restarting at 0 per sample,
    ``segment_ids`` (1, 2, ... per sample in its row, 0 for padding) that
    :func:`~mmkit.modeling.attention.packed_attention_mask` turns into the mask, and ``sample_rows``
    (the row of each sample; the model routes a row's LoRA from its samples' modalities).
    ``collate[m]``: the encoder's ``collate`` (``torch.stack`` when not given)."""

    pad_id: int
    collate: dict[str, Any] = attrs.field(factory=dict)
    skipped: list[Skipped] = attrs.field(factory=list)
    #: append skipped items to ``skipped`` here (``False`` when :class:`~mmkit.data.batching.Batches` counts them)
    record_skipped: bool = True
    #: see :attr:`mmkit.data.batching.Collator.encoders`
    encoders: dict[str, Any] | None = None

    def __call__(self, items: Sequence[dict[str, Any] | Skipped]) -> Batch:
        good, bad, empty = separate_skipped(items, self)
        if empty is not None:
            return empty
        rows: dict[int, list[dict[str, Any]]] = {}
        for item in good:
            rows.setdefault(item.get("row", 0), []).append(item)
        ordered = [rows[r] for r in sorted(rows)]
        width = max(sum(len(it["input_ids"]) for it in row) for row in ordered)
        shape = (len(ordered), width)
        ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(shape, dtype=torch.long)
        positions = torch.zeros(shape, dtype=torch.long)
        segments = torch.zeros(shape, dtype=torch.long)
        flat: list[dict[str, Any]] = []
        sample_rows: list[int] = []
        for r, row in enumerate(ordered):
            col = 0
            for seg, item in enumerate(row, start=1):
                n = len(item["input_ids"])
                ids[r, col:col + n] = torch.tensor(item["input_ids"])
                lab = torch.tensor(item["labels"])
                lab[0] = IGNORE_INDEX  # never a target for the previous sample's last token
                labels[r, col:col + n] = lab
                mask[r, col:col + n] = 1
                positions[r, col:col + n] = torch.arange(n)
                segments[r, col:col + n] = seg
                col += n
                flat.append(item)
                sample_rows.append(r)
            positions[r, col:] = torch.arange(width - col)  # padding: a sequence of its own
        inputs, features, pending = collate_modalities(flat, self.collate)
        batch = Batch(ids, labels, mask, ids=[item["id"] for item in flat],
                      modalities=tuple(tuple(item.get("modalities", ())) for item in flat),
                      sample_rows=tuple(sample_rows), inputs=inputs, features=features, pending=pending,
                      position_ids=positions, segment_ids=segments, num_tokens=int(mask.sum()),
                      num_slots=mask.numel(), skipped=len(bad), skipped_items=bad)
        if pending and self.encoders is not None:
            batch.fresh = encode_pending(batch, self.encoders)
        return batch


def lead_modality(sample: Sample) -> str:
    """A sample's first modality, or ``text``: the packing key when rows may not mix samples of
    different lead modalities (a per-modality LoRA trains each row on the lead modality's adapter)."""
    return sample.modalities[0] if sample.modalities else "text"


def make_batching(batching: str, samples: Sequence[Sample], dataset: torch.utils.data.Dataset, *, prompts: Any,
                  pad_id: int, micro_batch_size: int, grad_accum: int, rank: int, world_size: int, seed: int,
                  shuffle: bool = True, pack_max_tokens: int | None = None, mix_rows: bool = True,
                  collate: dict[str, Any] | None = None, lengths: Sequence[int] | None = None,
                  encoders: dict[str, Any] | None = None) -> tuple[Any, Any, Any]:
    """``(batch sampler, dataset to load from, collator)`` for ``batching`` = ``grouped`` or ``packed``.
    ``mix_rows=False``: a packed row holds samples of one lead modality only (:func:`lead_modality`;
    needed with one LoRA adapter per modality). ``lengths``: each sample's token count with its
    modality tokens (:func:`sample_lengths` when not given)."""
    from mmkit.data.batching import Collator

    lengths = list(lengths) if lengths is not None else sample_lengths(prompts, samples)
    groups = [modality_group(s) for s in samples]
    collate = dict(collate or {})
    common = {"micro_batch_size": micro_batch_size, "grad_accum": grad_accum, "rank": rank, "world_size": world_size,
              "seed": seed, "shuffle": shuffle}
    if batching == "grouped":
        return (GroupedBatchSampler(lengths, groups, **common), dataset,
                Collator(pad_id=pad_id, collate=collate, record_skipped=False, encoders=encoders))
    if batching == "packed":
        groups = ["all" if mix_rows else lead_modality(s) for s in samples]
        max_tokens = pack_max_tokens or 2 * (prompts.max_length or max(lengths))
        return (PackedBatchSampler(lengths, groups, max_tokens=max_tokens, **common), PackedView(dataset),
                PackingCollator(pad_id=pad_id, collate=collate, record_skipped=False, encoders=encoders))
    raise ValueError(f"batching {batching!r}: use pad, grouped or packed")

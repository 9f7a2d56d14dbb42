"""Padding fraction of pad-to-longest, grouped and packed batches over one epoch.

    python benchmarks/bench_padding.py

Two length distributions:

- the embedded demo's training data (image + point-cloud + text records; lengths counted with their
  modality tokens by the demo's own prompt builder);
- a synthetic LLaVA-1.5-like mix: 85 % image records (576 image tokens + 2 markers) and 15 % text-only,
  conversation text log-normal around 180 tokens with a long tail, at most 2048 tokens in all.

The fraction is padded slots / all slots over every micro-batch of an epoch, through the real
samplers and collators (no model runs). Packed batches hold about as many tokens as the padded ones
(``rows`` sequences of ``pack_max_tokens``).
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmkit.data.batching import Collator
from mmkit.data.packing import GroupedBatchSampler, PackedBatchSampler, PackedView, PackingCollator
from mmkit.data.sampler import GlobalBatchSampler


class _Items(torch.utils.data.Dataset):
    """Token-only items of the given lengths (what the collators need)."""

    def __init__(self, lengths: Sequence[int], groups: Sequence[str]):
        self.lengths, self.groups = list(lengths), list(groups)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = self.lengths[i]
        return {"id": str(i), "input_ids": [5] * n, "labels": [5] * n, "inputs": {}, "modalities": ()}


def epoch_padding(sampler: Any, dataset: Any, collate: Any) -> tuple[float, int]:
    """``(padding fraction over the epoch, micro-batches)``."""
    slots = real = batches = 0
    for indices in sampler:
        batch = collate([dataset[i] for i in indices])
        slots += batch.num_slots
        real += batch.num_tokens
        batches += 1
    return 1.0 - real / slots, batches


def compare(lengths: Sequence[int], groups: Sequence[str], *, batch_size: int, pack: Sequence[tuple[int, int]],
            seed: int = 0) -> list[tuple[str, float, int]]:
    """Rows ``(strategy, padding fraction, micro-batches)``; ``pack`` lists (pack_max_tokens, rows)."""
    data = _Items(lengths, groups)
    rows = []
    pad = GlobalBatchSampler(len(data), micro_batch_size=batch_size, grad_accum=1, rank=0, world_size=1, seed=seed)
    rows.append((f"pad to longest, random batches of {batch_size}", *epoch_padding(pad, data, Collator(pad_id=0))))
    grouped = GroupedBatchSampler(lengths, groups, micro_batch_size=batch_size, seed=seed)
    rows.append((f"grouped by modality and length, batches of {batch_size}",
                 *epoch_padding(grouped, data, Collator(pad_id=0))))
    for max_tokens, n_rows in pack:
        packed = PackedBatchSampler(lengths, ["shared"] * len(lengths), max_tokens=max_tokens, micro_batch_size=n_rows,
                                    seed=seed)
        rows.append((f"packed, {n_rows} x {max_tokens} tokens", *epoch_padding(packed, PackedView(data),
                                                                                 PackingCollator(pad_id=0))))
    return rows


def demo_lengths(root: Path) -> tuple[list[int], list[str]]:
    """The embedded demo's training records, measured by its prompt builder."""
    from mmkit.data.packing import modality_group, sample_lengths
    from mmkit.records import ReadContext
    from mmkit.data.sources import DataSource, read_mixture
    from mmkit.demo.task import prepare_demo
    from mmkit.modeling.assemble import assemble
    from mmkit.plugins import get_host
    from mmkit.training.config import resolve_config
    from mmkit.training.recipe import RunPlan, default_modalities, model_config

    host = get_host()
    # the image and point-cloud demos (the figures in docs/data.md); others when those are absent
    modalities = tuple(m for m in ("image", "pointcloud") if m in host.modalities()) or default_modalities(host)
    if not (root / "train.jsonl").is_file():
        prepare_demo(host, modalities, root, seed=0)
    cfg = resolve_config(None, {"modalities": list(modalities)})
    plan = RunPlan(llm=str(root / "base_llm"), modalities=tuple(modalities),
                   train_sources=(DataSource(root / "train.jsonl"),), eval_sources={}, chance={})
    assembled = assemble(model_config(cfg, plan), host)
    samples = read_mixture(host, plan.train_sources, ReadContext(modalities={m: host.modality(m) for m in modalities}))
    return sample_lengths(assembled.prompts, samples), [modality_group(s) for s in samples]


def llava_like_lengths(n: int = 20_000, seed: int = 0) -> tuple[list[int], list[str]]:
    rng = random.Random(seed)
    lengths, groups = [], []
    for _ in range(n):
        text = int(min(1400, max(20, rng.lognormvariate(math.log(180), 0.8))))
        if rng.random() < 0.85:
            lengths.append(min(2048, 576 + 2 + text))
            groups.append("image")
        else:
            lengths.append(min(2048, text))
            groups.append("text")
    return lengths, groups


def report(title: str, rows: list[tuple[str, float, int]]) -> None:
    print(f"\n{title}")
    for name, fraction, batches in rows:
        print(f"  {name:48} padding {fraction * 100:5.1f} %   ({batches} micro-batches)")


def main() -> None:
    torch.set_num_threads(1)
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/mmkit_bench_demo")
    lengths, groups = demo_lengths(root)
    report(f"demo data: {len(lengths)} records, {min(lengths)}-{max(lengths)} tokens "
           f"(mean {sum(lengths) / len(lengths):.1f})",
           compare(lengths, groups, batch_size=32, pack=[(128, 8), (256, 4), (512, 2)]))
    lengths, groups = llava_like_lengths()
    report(f"synthetic LLaVA-like: {len(lengths)} records, {min(lengths)}-{max(lengths)} tokens "
           f"(mean {sum(lengths) / len(lengths):.0f})",
           compare(lengths, groups, batch_size=16, pack=[(2048, 6), (4096, 3), (8192, 2)]))


if __name__ == "__main__":
    main()

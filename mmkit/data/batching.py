"""Turn samples into model inputs: load and preprocess each input file, tokenise through the prompt
builder, and pad into batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from mmkit.data.records import Sample
from mmkit.errors import DataError, InputError
from mmkit.modeling.lora import route_for_sample
from mmkit.prompt import IGNORE_INDEX, EncodedSample, PromptBuilder


@attrs.frozen
class Skipped:
    """A sample left out under ``--skip-bad-records``, and why."""

    where: str
    reason: str


Preprocess = Callable[[Path], torch.Tensor]


class SampleDataset(torch.utils.data.Dataset):
    """Samples -> ``{"input_ids", "labels", "inputs", "adapter", "id"}`` items."""

    def __init__(self, samples: Sequence[Sample], prompts: PromptBuilder, preprocess: Mapping[str, Preprocess],
                 adapters: Sequence[str], *, skip_bad_records: bool = False):
        self.samples = list(samples)
        self.prompts = prompts
        self.preprocess = dict(preprocess)
        self.adapters = list(adapters)
        self.skip_bad_records = skip_bad_records

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        sample = self.samples[index]
        try:
            return self.encode(sample)
        except (DataError, InputError) as exc:
            if not self.skip_bad_records:
                raise _as_data_error(sample, exc) from None
            return Skipped(sample.where, str(exc))

    def encode(self, sample: Sample, encoded: EncodedSample | None = None) -> dict[str, Any]:
        encoded = encoded or self.prompts.encode_sample(sample)
        inputs = {}
        for modality, paths in sample.inputs.items():
            if modality not in self.preprocess:
                raise DataError(sample.source, sample.index, f"has {modality} input but the model has no {modality} modality")
            inputs[modality] = [self.preprocess[modality](Path(p)) for p in paths]
        return {
            "id": sample.id,
            "input_ids": encoded.input_ids,
            "labels": encoded.labels,
            "inputs": inputs,
            "adapter": route_for_sample(sample.modalities, self.adapters),
        }


def _as_data_error(sample: Sample, exc: Exception) -> DataError:
    if isinstance(exc, DataError):
        return exc
    return DataError(sample.source, sample.index, f"id {sample.id}: {exc}")


def make_preprocessor(load: Callable[[Path], Any], preprocess: Callable[[Any], torch.Tensor]) -> Preprocess:
    def run(path: Path) -> torch.Tensor:
        tensor = preprocess(load(path))
        if not bool(torch.isfinite(tensor).all()):
            raise InputError(path, "preprocessing produced NaN or inf values")
        return tensor

    return run


@attrs.define
class Collator:
    """Pads a list of items into a batch. ``padding_side="left"`` for generation."""

    pad_id: int
    padding_side: str = "right"
    skipped: list[Skipped] = attrs.field(factory=list)

    def __call__(self, items: Sequence[dict[str, Any] | Skipped]) -> dict[str, Any]:
        good = []
        for item in items:
            if isinstance(item, Skipped):
                self.skipped.append(item)
            else:
                good.append(item)
        if not good:
            return {"empty": True, "skipped": len(items)}
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
        inputs: dict[str, list[torch.Tensor]] = {}
        for item in good:
            for modality, tensors in item["inputs"].items():
                inputs.setdefault(modality, []).extend(tensors)
        real = int(mask.sum())
        return {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": mask,
            "inputs": {m: torch.stack(t) for m, t in inputs.items()},
            "adapters": [item["adapter"] for item in good],
            "ids": [item["id"] for item in good],
            "num_tokens": real,
            "padding_fraction": 1.0 - real / mask.numel(),
            "skipped": len(items) - len(good),
        }

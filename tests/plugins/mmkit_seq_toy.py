"""A toy variable-size modality for the data-path tests (contract 1.1): a sequence of 4-d elements
(``.npy`` ``[n, 4]``), one token per element, the last row of each input marked as a separator (as a
frame break would be). Its batch is a padded tensor plus lengths, so collate, ``move`` (lengths stay
integer), the ragged splice and the cache's separator rows are all exercised. Register the module
itself as a plugin: ``host.register(mmkit_seq_toy, name="seqtoy")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from mmkit import EncoderSpec, InputError, MarkerSpec, ModalitySpec, hookimpl
from mmkit.modeling import PretrainedEncoder
from mmkit.modeling.features import RaggedFeatures

MODALITY = "seq"
DIM = 4


@hookimpl
def mmkit_modalities() -> list[ModalitySpec]:
    return [ModalitySpec(name=MODALITY, data_keys=("seq",), markers=MarkerSpec("<seq>"),
                         load="numpy:load", encoder="seqtoy", projector="mlp", file_types=(".npy",))]


@hookimpl
def mmkit_encoders() -> list[EncoderSpec]:
    return [EncoderSpec(name="seqtoy", modality=MODALITY, build="mmkit_seq_toy:build", tiny={"hidden": 8})]


class SeqBatch(NamedTuple):
    """A padded batch plus each input's length (a named tuple: ``move`` keeps it one)."""

    padded: torch.Tensor
    lengths: torch.Tensor


def build(**options: Any) -> SeqEncoder:
    return SeqEncoder.build(**options)


class SeqEncoder(PretrainedEncoder):
    num_tokens = None
    input_shape = None
    uses_separators = True

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.output_dim = int(config.get("hidden", 8))
        self.net = nn.Sequential(nn.Linear(DIM, self.output_dim), nn.Tanh(), nn.Linear(self.output_dim,
                                                                                      self.output_dim))

    def preprocess(self, raw: Any) -> torch.Tensor:
        x = torch.as_tensor(raw, dtype=torch.float32)
        if x.dim() != 2 or x.shape[1] != DIM or x.shape[0] < 1:
            raise InputError(f"expected a sequence [n >= 1, {DIM}], got shape {list(x.shape)}")
        return x

    def num_tokens_for(self, item: torch.Tensor) -> int:
        return int(item.shape[0])

    def collate(self, items: Sequence[torch.Tensor]) -> SeqBatch:
        lengths = torch.tensor([len(x) for x in items], dtype=torch.long)
        padded = torch.zeros(len(items), int(lengths.max()), DIM)
        for i, x in enumerate(items):
            padded[i, : len(x)] = x
        return SeqBatch(padded, lengths)

    def blank(self, batch_size: int = 1) -> SeqBatch:
        return SeqBatch(torch.zeros(batch_size, 1, DIM), torch.ones(batch_size, dtype=torch.long))

    def forward(self, batch: SeqBatch) -> Any:
        padded, lengths = batch
        assert lengths.dtype == torch.long  # move() casts floating leaves only
        out = self.net(padded.to(self.net[0].weight.dtype))
        counts = lengths.tolist()
        values = torch.cat([out[i, :n] for i, n in enumerate(counts)])
        seps = torch.zeros(values.shape[0], dtype=torch.bool, device=values.device)
        seps[torch.tensor(counts).cumsum(0) - 1] = True  # each input's last row: a layout mark
        return RaggedFeatures(values, counts, seps)

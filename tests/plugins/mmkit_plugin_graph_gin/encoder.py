"""The GIN encoder: a torch-geometric ``Data`` per input, one output row per node (contract 1.1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from mmkit import InputError
from mmkit.modeling import PretrainedEncoder
from mmkit.modeling.features import RaggedFeatures
from torch import nn
from torch_geometric.data import Batch, Data
from torch_geometric.nn import GINConv


class _Linear(nn.Linear):
    """A Linear that takes its input in its own weights' dtype. GINConv adds ``(1 + eps) * x`` with
    ``eps`` a buffer: DeepSpeed casts parameters to bf16 and leaves buffers in fp32, so without the
    cast the sum is promoted to fp32 and meets bf16 weights (the contract's mixed-precision check)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


class GINEncoder(PretrainedEncoder):
    """``num_layers`` GIN layers (sum aggregation, a 2-layer MLP each, fixed ``eps``), ReLU between."""

    num_tokens = None  # one token per node: the count follows the graph
    input_shape = None  # a torch_geometric Data, not one tensor shape

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.in_dim = int(config.get("in_dim", 4))
        hidden = int(config.get("hidden", 16))
        self.output_dim = hidden
        dims = [self.in_dim] + [hidden] * int(config.get("num_layers", 2))
        self.convs = nn.ModuleList(
            GINConv(nn.Sequential(_Linear(a, hidden), nn.ReLU(), _Linear(hidden, hidden)), eps=0.1, train_eps=False)
            for a in dims[:-1])

    def preprocess(self, raw: dict[str, Any]) -> Data:
        x = torch.as_tensor(raw["x"], dtype=torch.float32)
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise InputError(f"expected node features [nodes, {self.in_dim}], got shape {list(x.shape)}")
        return Data(x=x, edge_index=torch.as_tensor(raw["edge_index"], dtype=torch.long))

    def num_tokens_for(self, item: Data) -> int:
        return int(item.num_nodes)

    def collate(self, items: Sequence[Data]) -> Batch:
        return Batch.from_data_list(list(items))

    def blank(self, batch_size: int = 1) -> Batch:
        one = Data(x=torch.zeros(1, self.in_dim), edge_index=torch.zeros(2, 0, dtype=torch.long))
        return Batch.from_data_list([one] * batch_size)

    def forward(self, batch: Batch) -> RaggedFeatures:
        x, edges = batch.x, batch.edge_index
        for i, conv in enumerate(self.convs):
            x = conv(x, edges)
            if i < len(self.convs) - 1:
                x = torch.relu(x)
        counts = torch.bincount(batch.batch, minlength=batch.num_graphs)
        return RaggedFeatures(x, counts)

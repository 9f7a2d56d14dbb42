"""The interface every modality encoder implements."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ModalityEncoder(nn.Module):
    """A (usually frozen) feature extractor for one modality.

    Subclasses set ``num_tokens``, ``output_dim`` and ``input_shape`` and implement:

    - ``preprocess(raw) -> Tensor``: one raw input (what the modality's ``load`` returns) to a float
      tensor of shape ``input_shape``. Runs in data-loader workers: no model weights needed.
    - ``forward(x: Tensor[B, *input_shape]) -> Tensor[B, num_tokens, output_dim]``.
    - ``identity() -> dict``: a JSON-serialisable description of everything that changes the
      features (class, pretrained id, configuration, preprocessing). Checkpoints record it and the
      feature cache keys on it, so it must change whenever the output would.
    """

    num_tokens: int
    output_dim: int
    input_shape: tuple[int, ...]

    def preprocess(self, raw: Any) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def blank_input(self, batch_size: int = 1) -> torch.Tensor:
        """A zero input: used for the ablation in evaluation and for the dummy pass that keeps
        every rank running every modality under ZeRO-3."""
        return torch.zeros(batch_size, *self.input_shape)

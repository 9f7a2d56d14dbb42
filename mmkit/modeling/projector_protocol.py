"""What the assembler needs from a projector (``ProjectorSpec.build`` returns one).

A structural type: any ``nn.Module`` with this ``forward`` and attribute is a projector; it need
not subclass anything from mmkit. The built-in ones are in :mod:`mmkit.modeling.projectors`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from mmkit.modeling.features import RaggedFeatures


@runtime_checkable
class Projector(Protocol):
    """Encoder features -> LLM embeddings.

    ``forward`` takes ``Tensor[B, T, in_dim]`` (a fixed-size encoder) or
    :class:`~mmkit.modeling.features.RaggedFeatures` (a variable count per input) and returns
    ``Tensor[B, num_output_tokens, out_dim]``, or, when ``num_output_tokens`` is ``None`` (one output
    row per input row: linear, MLP), the same layout as its input with ``out_dim`` columns.
    """

    #: tokens each input becomes in the LLM's sequence; ``None``: as many as the encoder gives
    num_output_tokens: int | None

    def forward(self, features: torch.Tensor | RaggedFeatures) -> torch.Tensor | RaggedFeatures: ...

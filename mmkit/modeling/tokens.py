"""Modality markers in the tokenizer, and trainable embeddings for the tokens mmkit adds.

The base LLM's embedding matrix stays frozen and untouched: ids at or above ``first_new_id`` (the
tokenizer's size before markers were added) are looked up in a small trainable table instead.
That keeps the trainable state small, saves it separately, and works whether or not the base
model's vocabulary has padding rows.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import AddedToken
from torch import nn


def add_marker_tokens(tokenizer, tokens: Iterable[str]) -> list[str]:
    """Add tokens as atomic special tokens; returns those that were new."""
    vocab = tokenizer.get_vocab()
    new = [t for t in dict.fromkeys(tokens) if t not in vocab]
    if new:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False, single_word=False) for t in new],
                             special_tokens=True)
    return new


class ExtendedEmbedding(nn.Module):
    """Frozen base embeddings + a trainable table for added tokens."""

    def __init__(self, base: nn.Embedding, first_new_id: int, num_new: int):
        super().__init__()
        # Held through a getter, not as a submodule: the embedding already belongs to the LLM, and
        # registering it twice would confuse ZeRO-3's parameter bookkeeping and the state dict.
        self._base = lambda: base
        self.first_new_id = first_new_id
        from mmkit.modeling.loading import gathered

        with gathered([base.weight]):  # ZeRO-3 loads the LLM partitioned: read the whole table
            weight = base.weight.detach()
            # New rows start at the mean of the existing embeddings plus a little noise: a known-good
            # init (HF's mean resizing) that keeps the first forward passes in distribution.
            init = (weight.float().mean(0, keepdim=True)
                    + weight.float().std() * 0.02 * torch.randn(num_new, weight.shape[1]))
            self.new_tokens = nn.Parameter(init.to(weight.dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.first_new_id
        base_ids = input_ids.masked_fill(is_new, 0)
        embeds = self._base()(base_ids)
        if self.new_tokens.shape[0] == 0:
            return embeds
        new_ids = (input_ids - self.first_new_id).clamp(min=0, max=self.new_tokens.shape[0] - 1)
        new = self.new_tokens.to(embeds.dtype)[new_ids]
        return torch.where(is_new.unsqueeze(-1), new, embeds)

"""Attention masks the model builds from batch layout (packed rows)."""

from __future__ import annotations

import torch


def packed_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype, attn_implementation: str | None
                          ) -> torch.Tensor | None:
    """The attention mask for packed rows: causal within each sample, nothing across samples.

    - flash-attention implementations: ``None`` (transformers then finds the samples from the
      restarting position ids and runs varlen attention; no L x L mask is built);
    - ``sdpa``: a boolean ``[B, 1, L, L]`` mask (True: attend);
    - ``eager`` and others: an additive ``[B, 1, L, L]`` mask in ``dtype`` (0 or the dtype's minimum).

    Padding (segment 0) attends causally to padding only, so no row of the mask is empty.
    """
    if attn_implementation and "flash" in attn_implementation:
        return None
    length = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (same & causal)[:, None]
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)

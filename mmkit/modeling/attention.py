"""Attention masks (or, for flash attention, sample bounds) the model builds from batch layout (packed rows)."""

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


def packed_flash_kwargs(segment_ids: torch.Tensor) -> dict[str, object]:
    """Flash attention's variable-length arguments for packed rows: the bounds of every run of one
    segment (a sample, or a row's padding) in the ``[B * L]`` tokens laid end to end.

    transformers passes them to ``flash_attn_varlen_func``, which keeps attention inside each run. It
    finds the samples from the position ids itself only for a single row; with several packed rows it
    would otherwise attend across the samples of a row."""
    rows, length = segment_ids.shape
    flat = segment_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::length] = True  # every row starts a run, even with the segment id the last row ended with
    cu = torch.cat([starts.nonzero().view(-1), torch.tensor([rows * length], device=flat.device)]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}

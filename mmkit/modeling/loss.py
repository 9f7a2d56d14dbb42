"""The training loss, computed only where it is defined: at the positions whose next token is supervised.

A causal LM's forward computes logits at every position and the loss then ignores most of them (the
prompt, the modality slots, padding). With a 32,000-token vocabulary the output layer is about a fifth
of a ~100M LLM's matmuls, and the answer is a few tokens of a sample. So the output layer here sees
only the hidden states whose next token has a label, and the loss is the same mean cross-entropy over
the same targets as transformers' ``ForCausalLMLoss``.

The LLM's own forward still runs (a forward pre-hook on its output embeddings module picks the rows),
so whatever a model does to its logits after that module (Gemma's soft-capping, Cohere's scale) is
applied as always. A model whose forward does not call that module gets full logits, and the rows are
picked from them: the same loss, without the saving.

The last position of a row predicts nothing (its next token is outside the row), and under causal
attention nothing earlier depends on it: the model removes it (:func:`drop_last_position`) before the
LLM runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mmkit.prompt import IGNORE_INDEX


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """``targets[:, p] = labels[:, p + 1]``: what position ``p``'s logits are scored against
    (the last position: nothing)."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def drop_last_position(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Each ``[B, T, ...]`` tensor without its last position (``None`` stays ``None``)."""
    return tuple(None if t is None else t[:, :-1] for t in tensors)


@contextlib.contextmanager
def output_rows(llm: nn.Module, keep: torch.Tensor) -> Iterator[dict[str, bool]]:
    """Within: the LLM's output embeddings module receives only the hidden states at ``keep``
    (``[B, T]`` bool), as one ``[1, N, hidden]`` row. Yields ``{"applied": ...}``: whether it did
    (it does not when the module is not called on ``[B, T, hidden]`` states)."""
    state = {"applied": False}
    head = llm.get_output_embeddings() if hasattr(llm, "get_output_embeddings") else None
    if head is None:
        yield state
        return

    def pick(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        hidden = args[0] if args else None
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(keep.shape):
            return None
        state["applied"] = True
        return (hidden[keep].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(pick)
    try:
        yield state
    finally:
        handle.remove()


def supervised_forward(llm: nn.Module, targets: torch.Tensor, *, pick_rows: bool = True, **llm_kwargs: Any) -> Any:
    """``llm(**llm_kwargs)`` (``inputs_embeds`` and the rest, ``[B, T]``) with its loss for ``targets``
    (``[B, T]``: the token each position's logits are scored against, :func:`next_token_targets`),
    computing logits at the supervised positions only (``pick_rows=False``: at every position, then
    picked). The output's ``logits`` are those positions' (``[N, vocab]``, in batch order); ``loss`` is
    the mean cross-entropy over them (NaN when there are none, as transformers gives)."""
    keep = targets != IGNORE_INDEX
    with output_rows(llm, keep) if pick_rows else contextlib.nullcontext({"applied": False}) as picked:
        out = llm(**llm_kwargs)
    logits = out.logits[0] if picked["applied"] else out.logits[keep]
    out.logits = logits
    out.loss = nn.functional.cross_entropy(logits.float(), targets[keep], ignore_index=IGNORE_INDEX)
    return out

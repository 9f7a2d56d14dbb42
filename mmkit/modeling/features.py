"""Features of inputs whose token counts differ (contract 1.1), and moving any batch to a device.

A fixed-size encoder returns ``Tensor[B, num_tokens, dim]``. A variable-size one (any-resolution
images, video, graphs, long audio) returns :class:`RaggedFeatures`: the rows of every input of the
batch one after another, with each input's count. The model splices rows into each input's slots in
order, so the flat layout is all it needs; ``padded()`` serves modules that want a rectangle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch


def _counts(value: Any) -> tuple[int, ...]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return tuple(int(v) for v in value)


# slots=False: DeepSpeed ZeRO-3's post-forward hook reads a module output that is not a tensor, list or
# dict through vars(); a slotted class has no __dict__ and every variable-size encoder failed there.
@attrs.frozen(eq=False, slots=False)
class RaggedFeatures:
    """``values[sum(counts), dim]``: input ``i``'s rows are ``counts[i]`` consecutive rows.

    ``separators`` (optional, bool ``[sum(counts)]``) marks rows that are layout, not content (the
    newline closing each row of an any-resolution image grid, a frame break in a video): a projector
    built with ``separator=True`` puts its learned separator embedding there, as LLaVA-NeXT's
    ``image_newline`` does.
    """

    values: torch.Tensor
    counts: tuple[int, ...] = attrs.field(converter=_counts)
    separators: torch.Tensor | None = None

    def __attrs_post_init__(self) -> None:
        if self.values.dim() != 2:
            raise ValueError(f"RaggedFeatures.values must be [rows, dim], got shape {list(self.values.shape)}")
        if sum(self.counts) != self.values.shape[0]:
            raise ValueError(f"RaggedFeatures: counts sum to {sum(self.counts)} but values has "
                             f"{self.values.shape[0]} rows")
        if self.separators is not None and tuple(self.separators.shape) != (self.values.shape[0],):
            raise ValueError(f"RaggedFeatures.separators must be [{self.values.shape[0]}], got "
                             f"{list(self.separators.shape)}")

    @classmethod
    def from_list(cls, rows: Sequence[torch.Tensor], separators: Sequence[torch.Tensor | None] | None = None
                  ) -> RaggedFeatures:
        """One ``[n_i, dim]`` tensor per input (what the feature cache keeps per input)."""
        values = torch.cat(list(rows)) if rows else torch.zeros(0, 0)
        seps = None
        if separators is not None and any(s is not None for s in separators):
            seps = torch.cat([s if s is not None else torch.zeros(len(r), dtype=torch.bool, device=r.device)
                              for r, s in zip(rows, separators, strict=True)])
        return cls(values, [len(r) for r in rows], seps)

    @property
    def batch_size(self) -> int:
        return len(self.counts)

    @property
    def dim(self) -> int:
        return self.values.shape[-1]

    def split(self) -> list[torch.Tensor]:
        """One ``[n_i, dim]`` tensor per input."""
        return list(torch.split(self.values, list(self.counts)))

    def split_separators(self) -> list[torch.Tensor | None]:
        if self.separators is None:
            return [None] * len(self.counts)
        return list(torch.split(self.separators, list(self.counts)))

    def padded(self, value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Tensor[B, max_n, dim], mask[B, max_n])``; ``mask`` is True at real rows."""
        longest = max(self.counts, default=0)
        out = self.values.new_full((len(self.counts), longest, self.dim), value)
        mask = torch.zeros(len(self.counts), longest, dtype=torch.bool, device=self.values.device)
        for i, rows in enumerate(self.split()):
            out[i, : len(rows)] = rows
            mask[i, : len(rows)] = True
        return out, mask

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> RaggedFeatures:
        """The same layout with ``fn`` applied to the rows (a token-wise projector)."""
        return RaggedFeatures(fn(self.values), self.counts, self.separators)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> RaggedFeatures:
        seps = self.separators if self.separators is None or device is None else self.separators.to(device)
        return RaggedFeatures(self.values.to(device=device, dtype=dtype), self.counts, seps)


def move(obj: Any, device: Any, float_dtype: torch.dtype | None = None) -> Any:
    """``obj`` on ``device``, with only its floating-point tensors cast to ``float_dtype``.

    Integer leaves (token ids, a graph's ``edge_index``, lengths) keep their dtype: casting 257 to
    bf16 gives 256. Handles tensors, lists, tuples, dicts, :class:`RaggedFeatures` and objects with an
    ``apply(fn)`` method over their tensors (torch-geometric ``Data`` / ``Batch``)."""

    def leaf(t: torch.Tensor) -> torch.Tensor:
        if float_dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=float_dtype, non_blocking=True)
        return t.to(device=device, non_blocking=True)

    if isinstance(obj, torch.Tensor):
        return leaf(obj)
    if isinstance(obj, RaggedFeatures):
        return RaggedFeatures(leaf(obj.values), obj.counts,
                              None if obj.separators is None else obj.separators.to(device))
    if isinstance(obj, list):
        return [move(o, device, float_dtype) for o in obj]
    if isinstance(obj, tuple):
        items = [move(o, device, float_dtype) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, dict):
        return {k: move(v, device, float_dtype) for k, v in obj.items()}
    apply = getattr(obj, "apply", None)
    if callable(apply) and not isinstance(obj, torch.nn.Module):
        return apply(leaf)  # torch-geometric Data/Batch: applies to every tensor attribute, in place
    return obj

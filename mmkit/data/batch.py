"""The batch every collator returns and the model, the training loop, the bench and evaluation read.

One typed record instead of a dict whose keys depend on the collator: a padded batch, a packed one
(``position_ids``, ``segment_ids``, ``sample_rows``) and one with cached features (``features``)
have the same fields, unset ones ``None``. The modalities of each sample travel with the batch and
the model picks LoRA routes from them; nothing in ``data/`` knows about adapters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch

from mmkit.modeling.features import move


@attrs.define(eq=False)
class Batch:
    """A micro-batch.

    - ``input_ids``, ``labels``, ``attention_mask``: ``[rows, width]``;
    - ``ids``: the record id of each sample, in batch order (a packed row holds several samples);
    - ``modalities``: each sample's modalities (aligned with ``ids``); ``sample_rows``: the row of each
      sample in a packed batch (``None``: sample ``i`` is row ``i``);
    - ``inputs[m]``: modality ``m``'s preprocessed inputs in batch order (sample by sample, each in
      placeholder order), collated by the encoder's ``collate``;
    - ``features[m]``: cached encoder features of those inputs (``Tensor[K, T, dim]`` or
      :class:`~mmkit.modeling.features.RaggedFeatures`), when a feature cache serves the batch;
    - ``position_ids``, ``segment_ids``: packed rows (positions restart per sample, segment per sample);
    - ``num_tokens``: real (non-padding) tokens; ``num_slots``: token positions computed, padding included;
    - ``skipped`` / ``skipped_items``: samples of the micro-batch left out (``--skip-bad-records``).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    ids: list[Any] = attrs.field(factory=list)
    modalities: tuple[tuple[str, ...], ...] = ()
    sample_rows: tuple[int, ...] | None = None
    inputs: dict[str, Any] = attrs.field(factory=dict)
    features: dict[str, Any] | None = None
    position_ids: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    num_tokens: int = 0
    num_slots: int = 0
    skipped: int = 0
    skipped_items: list[Any] = attrs.field(factory=list)
    #: cache misses the main process encodes (``Batches.complete``): ``{m: (places, items, keys)}``
    pending: dict[str, tuple[list[int], list[Any], list[str | None]]] | None = None
    #: features a loader worker encoded for cache misses, for the main process to store: ``(m, key, features)``
    fresh: list[tuple[str, str, Any]] | None = None

    @classmethod
    def empty(cls, skipped_items: Sequence[Any] = ()) -> Batch:
        """The stand-in for a micro-batch whose records all failed to load: no rows. The loop runs
        an earlier batch with zero weight instead, so every process still does a pass."""
        none = torch.zeros(0, 0, dtype=torch.long)
        return cls(none, none.clone(), none.clone(), skipped=len(skipped_items), skipped_items=list(skipped_items))

    @property
    def is_empty(self) -> bool:
        return self.input_ids.shape[0] == 0

    @property
    def samples(self) -> int:
        return len(self.ids)

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.num_tokens / self.num_slots if self.num_slots else float("nan")

    def to(self, device: Any, float_dtype: torch.dtype | None = None) -> Batch:
        """The batch on ``device``; only floating-point leaves of the inputs and features are cast to
        ``float_dtype`` (token ids, lengths and a graph's ``edge_index`` keep theirs)."""
        def one(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return attrs.evolve(
            self, input_ids=one(self.input_ids), labels=one(self.labels), attention_mask=one(self.attention_mask),
            position_ids=one(self.position_ids), segment_ids=one(self.segment_ids),
            inputs={m: move(v, device, float_dtype) for m, v in self.inputs.items()},
            features=None if self.features is None else {m: move(v, device, float_dtype)
                                                         for m, v in self.features.items()})

    def model_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`mmkit.modeling.model.MultimodalLM.forward` (and of the
        DeepSpeed engine wrapping it). Move the batch first (:meth:`to`)."""
        out: dict[str, Any] = {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                               "labels": self.labels, "inputs": self.inputs, "modalities": self.modalities}
        if self.sample_rows is not None:
            out["sample_rows"] = self.sample_rows
        for key in ("position_ids", "segment_ids", "features"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

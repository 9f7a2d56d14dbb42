"""LoRA on the shared LLM through peft, with one adapter per modality routed per sample.

peft creates and saves the adapters. Routing is ours: peft's own mixed-batch path refuses training
mode and visits adapters in set order, which differs between processes; under ZeRO-3 every rank
must touch the same modules in the same order. So each LoRA layer runs with no active adapter and
a forward hook adds every adapter's contribution, in a fixed order, masked to the rows routed to
it. Every adapter runs on the whole batch (an adapter with no rows contributes exact zeros), which
keeps ranks in step; LoRA's rank is small, so the extra work is a few percent of the base layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

TEXT_ADAPTER = "text"
SHARED_ADAPTER = "shared"


@attrs.frozen
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: tuple[str, ...] = ()
    #: "per_modality" (one adapter per modality + one for text-only samples) or "shared"
    mode: str = "per_modality"


def adapter_names_for(modalities: Sequence[str], mode: str) -> list[str]:
    if mode == "shared":
        return [SHARED_ADAPTER]
    if mode != "per_modality":
        raise ValueError(f"unknown LoRA mode {mode!r}: use 'per_modality' or 'shared'")
    return [*modalities, TEXT_ADAPTER]


def route_for_sample(sample_modalities: Sequence[str], adapters: Sequence[str]) -> str:
    """The adapter a sample trains: its first modality's (LAMM's modality-specific LoRA), the text
    adapter for text-only samples, or the shared one."""
    if len(adapters) == 1:
        return adapters[0]
    return sample_modalities[0] if sample_modalities else TEXT_ADAPTER


def routes_for_rows(modalities: Sequence[Sequence[str]], adapters: Sequence[str],
                    sample_rows: Sequence[int] | None = None, rows: int | None = None) -> list[str]:
    """The adapter of each batch row from its samples' modalities (``modalities[i]``: sample ``i``'s;
    ``sample_rows[i]``: its row in a packed batch, ``None``: one sample per row). A packed row whose
    samples route to different adapters is refused: it would train some of them on the wrong one."""
    if sample_rows is None:
        return [route_for_sample(m, adapters) for m in modalities]
    out: list[str | None] = [None] * (rows if rows is not None else max(sample_rows, default=-1) + 1)
    for sample_modalities, row in zip(modalities, sample_rows, strict=True):
        route = route_for_sample(sample_modalities, adapters)
        if out[row] is not None and out[row] != route:
            raise ValueError(f"packed row {row} mixes LoRA routes {sorted({out[row], route})}")
        out[row] = route
    return [r if r is not None else route_for_sample((), adapters) for r in out]


class RoutedLora:
    """Adds LoRA adapters to ``llm`` and routes each batch row to one adapter."""

    def __init__(self, llm: nn.Module, adapters: Sequence[str], settings: LoraSettings):
        config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                            target_modules=list(settings.targets), bias="none")
        self.adapters = list(adapters)
        self.peft_model = get_peft_model(llm, config, adapter_name=self.adapters[0])
        for name in self.adapters[1:]:
            self.peft_model.add_adapter(name, config)
        self.model = self.peft_model.base_model.model  # the HF model with LoRA layers inside
        self.layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        if not self.layers:
            raise ValueError(f"LoRA targets {settings.targets} matched no module of the LLM")
        self._masks: dict[str, torch.Tensor] | None = None
        if len(self.adapters) > 1:
            for layer in self.layers:
                layer.set_adapter([])  # peft applies nothing itself; the hook below does
                layer.register_forward_hook(self._hook)
        for param in self.parameters():
            param.requires_grad_(True)

    def routes_rows_of(self, module: nn.Module) -> bool:
        """Whether ``module`` is a LoRA layer whose adapters are masked per batch row (its input must
        keep the batch's rows)."""
        return len(self.adapters) > 1 and any(layer is module for layer in self.layers)

    def parameters(self, adapter: str | None = None):
        for name, param in self.model.named_parameters():
            if "lora_" in name and (adapter is None or f".{adapter}." in name or name.endswith(f".{adapter}")):
                yield param

    def set_routes(self, adapter_per_row: Sequence[str], device: torch.device) -> None:
        """Route batch rows to adapters for the next forward passes (and their recomputation
        under gradient checkpointing)."""
        if len(self.adapters) == 1:
            return
        unknown = set(adapter_per_row) - set(self.adapters)
        if unknown:
            raise ValueError(f"no LoRA adapter named {sorted(unknown)}; adapters: {self.adapters}")
        self._masks = {
            name: torch.tensor([float(a == name) for a in adapter_per_row], device=device)
            for name in self.adapters
        }

    def route(self, modalities: Sequence[Sequence[str]], device: torch.device,
              sample_rows: Sequence[int] | None = None, rows: int | None = None, repeat: int = 1) -> None:
        """:meth:`set_routes` from the samples' modalities (:func:`routes_for_rows`); ``repeat``
        copies each row's route that many times, side by side (beam search)."""
        if len(self.adapters) == 1:
            return
        routes = routes_for_rows(modalities, self.adapters, sample_rows, rows)
        self.set_routes([r for r in routes for _ in range(repeat)], device)

    def _hook(self, layer: LoraLayer, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self._masks is None:
            raise RuntimeError("LoRA routes not set: call set_routes() before the forward pass")
        x = args[0]
        for name in self.adapters:  # fixed order: the same on every rank
            lora_in = layer.lora_dropout[name](x.to(layer.lora_A[name].weight.dtype))
            delta = layer.lora_B[name](layer.lora_A[name](lora_in)) * layer.scaling[name]
            mask = self._masks[name].to(delta.dtype)
            if mask.shape[0] != delta.shape[0]:  # never broadcast one row's route over others
                raise RuntimeError(f"LoRA routes set for {mask.shape[0]} rows, but the layer got {delta.shape[0]}")
            output = output + (delta * mask.view(-1, *([1] * (delta.dim() - 1)))).to(output.dtype)
        return output

"""The multimodal model: frozen encoders -> trainable projectors -> shared LLM with LoRA.

Projected features replace the placeholder slots the prompt builder put into ``input_ids``; every
other token is embedded by the LLM (markers by a small trainable table, see ``tokens.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mmkit.errors import DataError
from mmkit.modeling.encoder import ModalityEncoder
from mmkit.modeling.lora import RoutedLora
from mmkit.modeling.tokens import ExtendedEmbedding


class MultimodalLM(nn.Module):
    def __init__(self, llm: nn.Module, encoders: Mapping[str, ModalityEncoder], projectors: Mapping[str, nn.Module],
                 placeholder_ids: Mapping[str, int], embeddings: ExtendedEmbedding, lora: RoutedLora | None,
                 train_encoders: bool = False):
        super().__init__()
        self.llm = llm
        self.encoders = nn.ModuleDict(dict(encoders))
        self.projectors = nn.ModuleDict(dict(projectors))
        self.embeddings = embeddings
        self.placeholder_ids = dict(placeholder_ids)
        self.modalities = tuple(encoders)
        self.lora = lora
        self.train_encoders = train_encoders
        self.hidden_size = getattr(llm.get_input_embeddings().weight, "ds_shape", (0, 0))[1] or \
            llm.get_input_embeddings().weight.shape[1]  # ds_shape: the full shape of a ZeRO-3 partitioned weight
        for encoder in self.encoders.values():
            encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> MultimodalLM:
        super().train(mode)
        if not self.train_encoders:
            for encoder in self.encoders.values():
                encoder.eval()  # frozen encoders never use dropout / batch statistics
        return self

    # -- features ----------------------------------------------------------------------------
    def encode(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """Raw preprocessed inputs ``[K, ...]`` -> projected features ``[K, T, hidden]``."""
        encoder = self.encoders[modality]
        param = next(encoder.parameters(), None)
        if param is not None:
            inputs = inputs.to(device=param.device, dtype=param.dtype if inputs.is_floating_point() else inputs.dtype)
        if self.train_encoders:
            features = encoder(inputs)
        else:
            with torch.no_grad():
                features = encoder(inputs)
        projector = self.projectors[modality]
        proj_param = next(projector.parameters())
        return projector(features.to(proj_param.dtype))

    def embed(self, input_ids: torch.Tensor, inputs: Mapping[str, torch.Tensor],
              features: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Token embeddings with each modality's slots filled by its projected features.

        ``inputs[m]`` stacks modality ``m``'s inputs in batch order (sample by sample, each in
        placeholder order). ``features[m]``, when given, are precomputed encoder outputs (the feature
        cache) and skip the encoder. A modality with nothing in this batch still runs on a blank
        input and adds ``0 * output``: under ZeRO-3 every rank must run every module, or ranks that
        saw different modalities wait on each other forever.
        """
        embeds = self.embeddings(input_ids)
        zero = embeds.new_zeros(())
        for modality in self.modalities:
            slot = input_ids == self.placeholder_ids[modality]
            if features is not None and modality in features:
                projector = self.projectors[modality]
                projected = projector(features[modality].to(next(projector.parameters()).dtype))
            elif modality in inputs and inputs[modality].shape[0] > 0:
                projected = self.encode(modality, inputs[modality])
            else:
                projected = None
            if projected is None:
                if bool(slot.any()):
                    raise DataError("batch", None, f"{int(slot.sum())} {modality} slots but no {modality} input")
                if self.training and features is not None:
                    # cached features: no process runs an encoder, so neither does the blank pass
                    encoder, projector = self.encoders[modality], self.projectors[modality]
                    blank = next(projector.parameters()).new_zeros(1, encoder.num_tokens, encoder.output_dim)
                    zero = zero + 0.0 * projector(blank).sum()
                elif self.training:
                    blank = self.encoders[modality].blank_input(1)
                    zero = zero + 0.0 * self.encode(modality, blank).sum()
                continue
            flat = projected.reshape(-1, projected.shape[-1]).to(embeds.dtype)
            if int(slot.sum()) != flat.shape[0]:
                raise DataError("batch", None, f"{int(slot.sum())} {modality} slots for {projected.shape[0]} inputs "
                                               f"x {projected.shape[1]} tokens")
            embeds = embeds.masked_scatter(slot.unsqueeze(-1), flat)
        return embeds + zero

    # -- training forward ----------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                inputs: Mapping[str, torch.Tensor] | None = None, adapters: Sequence[str] | None = None,
                position_ids: torch.Tensor | None = None, features: Mapping[str, torch.Tensor] | None = None,
                segment_ids: torch.Tensor | None = None):
        """``segment_ids`` (packed rows, see ``mmkit.data.packing``): which sample each token belongs
        to; attention then stays inside each sample (``position_ids`` must restart per sample)."""
        if self.lora is not None and adapters is not None:
            self.lora.set_routes(adapters, input_ids.device)
        embeds = self.embed(input_ids, inputs or {}, features)
        if segment_ids is not None:
            from mmkit.data.packing import packed_attention_mask

            attention_mask = packed_attention_mask(segment_ids, embeds.dtype,
                                                   getattr(self.llm.config, "_attn_implementation", None))
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                        labels=labels, use_cache=False)

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, inputs: Mapping[str, torch.Tensor],
                 adapters: Sequence[str] | None, *, max_new_tokens: int, stop_ids: set[int], allowed_vocab: int,
                 pad_id: int) -> list[list[int]]:
        """Greedy decoding with a KV cache over left-padded prompts. Tokens at or above
        ``allowed_vocab`` (mmkit's markers) are never produced."""
        if self.lora is not None and adapters is not None:
            self.lora.set_routes(adapters, input_ids.device)
        embeds = self.embed(input_ids, inputs)
        mask = attention_mask
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        batch = input_ids.shape[0]
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        generated: list[list[int]] = [[] for _ in range(batch)]
        next_pos = positions[:, -1:] + 1
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1, :].float()
            if logits.shape[-1] > allowed_vocab:
                logits[:, allowed_vocab:] = float("-inf")
            token = logits.argmax(-1)
            for i in range(batch):
                if not finished[i]:
                    generated[i].append(int(token[i]))
            finished |= torch.tensor([int(t) in stop_ids for t in token], device=token.device)
            if bool(finished.all()):
                break
            token = torch.where(finished, torch.full_like(token, pad_id), token)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = self.llm(inputs_embeds=self.embeddings(token[:, None]), attention_mask=mask, position_ids=next_pos,
                           past_key_values=out.past_key_values, use_cache=True)
            next_pos = next_pos + 1
        return [[t for t in seq if t not in stop_ids] for seq in generated]

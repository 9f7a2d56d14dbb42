"""The multimodal model: frozen encoders -> trainable projectors -> shared LLM with LoRA.

Projected features replace the placeholder slots the prompt builder put into ``input_ids``; every
other token is embedded by the LLM (markers by a small trainable table, see ``tokens.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from mmkit.errors import ConfigError, DataError
from mmkit.generation import GenerationOptions
from mmkit.modeling.attention import packed_attention_mask
from mmkit.modeling.encoder import ModalityEncoder
from mmkit.modeling.loading import full_shape
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
        self.hidden_size = full_shape(llm.get_input_embeddings().weight)[1]
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
            attention_mask = packed_attention_mask(segment_ids, embeds.dtype,
                                                   getattr(self.llm.config, "_attn_implementation", None))
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                        labels=labels, use_cache=False)

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, inputs: Mapping[str, torch.Tensor],
                 adapters: Sequence[str] | None, *, max_new_tokens: int | None = None, stop_ids: set[int],
                 allowed_vocab: int, pad_id: int, options: GenerationOptions | None = None, tokenizer: Any = None,
                 streamer: Any = None) -> list[list[int]]:
        """Decode through the LLM's own ``generate`` from the prompts' embeddings (left-padded rows).

        ``options`` picks greedy (default), sampling or beams (``max_new_tokens`` overrides its
        length). Tokens at or above ``allowed_vocab`` (mmkit's markers, and any vocabulary padding
        rows) are suppressed, so never produced. ``tokenizer`` is needed for stop strings;
        ``streamer`` (one row only) receives tokens as they come. Returns each row's new tokens up to,
        not including, its first stop token.
        """
        from transformers import GenerationConfig

        options = options or GenerationOptions()
        if max_new_tokens is not None:
            options = attrs.evolve(options, max_new_tokens=max_new_tokens)
        if streamer is not None and (input_ids.shape[0] != 1 or options.num_beams > 1):
            raise ConfigError("streaming answers one prompt at a time, without beam search")
        if options.stop and tokenizer is None:
            raise ConfigError("stop strings need the tokenizer")
        if self.lora is not None and adapters is not None:
            # transformers repeats each row once per beam, next to itself: route the copies alike
            self.lora.set_routes([a for a in adapters for _ in range(options.num_beams)], input_ids.device)
        embeds = self.embed(input_ids, inputs)
        vocab = self.llm.get_output_embeddings().weight.shape[0]
        stops = sorted(stop_ids)
        config = GenerationConfig(
            **options.hf_kwargs(stop_strings=False), eos_token_id=stops or None, pad_token_id=pad_id,
            suppress_tokens=list(range(allowed_vocab, vocab)) or None, use_cache=True)
        # The model's own generation_config (sampling defaults of chat models) must not leak in:
        # decoding is exactly what ``options`` says.
        saved, self.llm.generation_config = self.llm.generation_config, config
        try:
            if options.seed is not None:
                torch.manual_seed(options.seed)
            stopping = [stop_on_strings(options.stop, tokenizer)] if options.stop else None
            with warnings.catch_warnings():
                # the prompt is embeddings, so the penalty counts generated tokens only: documented
                warnings.filterwarnings("ignore", message=".*repetition_penalty.*inputs_embeds")
                sequences = self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                              generation_config=config, stopping_criteria=stopping,
                                              streamer=streamer)
        finally:
            self.llm.generation_config = saved
        result = []
        for row in sequences.tolist():
            cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
            result.append(row[:cut])
        return result


def stop_on_strings(stops: Sequence[str], tokenizer: Any) -> Any:
    """Stop a row once its decoded text holds one of ``stops``. transformers' own stop strings read
    the tokenizer's vocabulary in a way word-level tokenizers break; decoding the tail of each row
    works for any tokenizer."""
    from transformers import StoppingCriteria

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            window = max(len(s) for s in stops) + 8  # tokens: each decodes to at least a character or nothing
            done = [any(s in tokenizer.decode(row[-window:], skip_special_tokens=True) for s in stops)
                    for row in input_ids.tolist()]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return _Stop()

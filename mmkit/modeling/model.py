"""The multimodal model: frozen encoders -> trainable projectors -> shared LLM with LoRA.

Projected features replace the placeholder slots the prompt builder put into ``input_ids``; every
other token is embedded by the LLM (markers by a small trainable table, see ``tokens.py``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from mmkit.errors import ConfigError, DataError
from mmkit.generation import GenerationOptions
from mmkit.modeling.attention import packed_attention_mask, packed_flash_kwargs
from mmkit.modeling.encoder import ModalityEncoder
from mmkit.modeling.features import RaggedFeatures, move
from mmkit.modeling.loading import full_shape
from mmkit.modeling.lora import RoutedLora
from mmkit.modeling.loss import drop_last_position, next_token_targets, supervised_forward
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
        #: inputs one encoder call takes at most (see :meth:`encode`)
        self.encode_chunk = 32
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
    def encode(self, modality: str, inputs: Any) -> Any:
        """A collated batch of preprocessed inputs -> projected features: ``Tensor[K, T, hidden]``
        (a fixed-size encoder) or :class:`RaggedFeatures` (a variable-size one). Only floating-point
        leaves take the encoder's dtype. A batch larger than ``encode_chunk`` whose leaves all
        stack its inputs (see :func:`split_batch`) is encoded in chunks (a packed batch holds many samples; each call's memory stays what a padded batch
        needs), except under ZeRO-3, where every process must call each encoder once per pass."""
        encoder = self.encoders[modality]
        param = next(encoder.parameters(), None)
        if param is not None:
            inputs = move(inputs, param.device, param.dtype)
        with contextlib.nullcontext() if self.train_encoders else torch.no_grad():
            chunks = None if _partitioned(encoder) else split_batch(inputs, self.encode_chunk)
            if chunks is not None:
                features = _concat([encoder(part) for part in chunks])
            else:
                features = encoder(inputs)
        return self.project(modality, features)

    def project(self, modality: str, features: Any) -> Any:
        """Encoder features (a tensor or :class:`RaggedFeatures`) -> LLM embeddings, in the
        projector's dtype."""
        projector = self.projectors[modality]
        return projector(move(features, None, next(projector.parameters()).dtype))

    def embed(self, input_ids: torch.Tensor, inputs: Mapping[str, Any],
              features: Mapping[str, Any] | None = None) -> torch.Tensor:
        """Token embeddings with each modality's slots filled by its projected features.

        ``inputs[m]`` is modality ``m``'s collated inputs in batch order (sample by sample, each in
        placeholder order); the features' rows (``reshape(-1, hidden)`` of a tensor, ``.values`` of
        :class:`RaggedFeatures`) fill the slots in that order. ``features[m]``, when given, are
        precomputed encoder outputs (the feature cache) and skip the encoder. In training, a modality
        with nothing in this batch runs on a blank input and adds ``0 * output`` when other processes
        may run it (more than one process, or ZeRO-3): every rank must run every module there, or
        ranks that saw different modalities wait on each other forever. One process skips it.
        """
        embeds = self.embeddings(input_ids)
        zero = None
        for modality in self.modalities:
            slot = input_ids == self.placeholder_ids[modality]
            if features is not None and modality in features:
                projected = self.project(modality, features[modality])
            elif modality in inputs and _batch_size(inputs[modality]) != 0:
                projected = self.encode(modality, inputs[modality])
            else:
                projected = None
            if projected is None:
                if bool(slot.any()):
                    raise DataError("batch", None, f"{int(slot.sum())} {modality} slots but no {modality} input")
                if self.training and self._blank_pass_needed(modality):
                    blank = self._blank(modality, cached=features is not None)
                    zero = 0.0 * blank.sum() + (0.0 if zero is None else zero)
                continue
            if isinstance(projected, RaggedFeatures):
                flat, what = projected.values, f"{projected.batch_size} inputs of {list(projected.counts)} tokens"
            else:
                flat = projected.reshape(-1, projected.shape[-1])
                what = f"{projected.shape[0]} inputs x {projected.shape[1]} tokens"
            if int(slot.sum()) != flat.shape[0]:
                raise DataError("batch", None, f"{int(slot.sum())} {modality} slots for {what}")
            embeds = embeds.masked_scatter(slot.unsqueeze(-1), flat.to(embeds.dtype))
        return embeds if zero is None else embeds + zero

    def _blank_pass_needed(self, modality: str) -> bool:
        """Whether another process may run this modality's modules in this pass (see :meth:`embed`)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return True
        return _partitioned(self.projectors[modality]) or _partitioned(self.encoders[modality])

    def _blank(self, modality: str, *, cached: bool) -> Any:
        encoder, projector = self.encoders[modality], self.projectors[modality]
        if not cached:
            return _values(self.encode(modality, encoder.blank(1)))  # blank() serves 1.0's blank_input too
        # cached features: no process runs an encoder, so neither does the blank pass
        param = next(projector.parameters())
        if encoder.num_tokens is None:
            return _values(projector(RaggedFeatures(param.new_zeros(1, encoder.output_dim), (1,))))
        return _values(projector(param.new_zeros(1, encoder.num_tokens, encoder.output_dim)))

    # -- training forward ----------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                inputs: Mapping[str, Any] | None = None, modalities: Sequence[Sequence[str]] | None = None,
                position_ids: torch.Tensor | None = None, features: Mapping[str, Any] | None = None,
                segment_ids: torch.Tensor | None = None, sample_rows: Sequence[int] | None = None):
        """The fields of a :class:`mmkit.data.batch.Batch` (``batch.model_kwargs()``).

        ``modalities``: each sample's modalities; the LoRA route of each row follows from them
        (``sample_rows``: a packed batch's row of each sample). ``segment_ids`` (packed rows, see
        ``mmkit.data.packing``): which sample each token belongs to; attention then stays inside
        each sample (``position_ids`` must restart per sample). With ``labels``, logits and loss
        are computed at the supervised positions only (:mod:`mmkit.modeling.loss`), and each row's last
        position, which predicts nothing, is not run."""
        if self.lora is not None and modalities is not None:
            self.lora.route(modalities, input_ids.device, sample_rows, rows=input_ids.shape[0])
        embeds = self.embed(input_ids, inputs or {}, features)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        targets = None
        if labels is not None:
            targets = next_token_targets(labels)
            if labels.shape[1] > 1:  # the last position predicts nothing: not run
                embeds, attention_mask, position_ids, segment_ids, targets = drop_last_position(
                    embeds, attention_mask, position_ids, segment_ids, targets)
        layout: dict[str, Any] = {}
        if segment_ids is not None:
            implementation = getattr(self.llm.config, "_attn_implementation", None)
            attention_mask = packed_attention_mask(segment_ids, embeds.dtype, implementation)
            if attention_mask is None:  # flash attention: the samples' bounds instead of a mask
                layout = packed_flash_kwargs(segment_ids)
        if targets is None:
            return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False, **layout)
        head = self.llm.get_output_embeddings()
        # a LoRA layer masked per batch row cannot take the supervised positions as one row
        pick_rows = self.lora is None or not self.lora.routes_rows_of(head)
        return supervised_forward(self.llm, targets, pick_rows=pick_rows, inputs_embeds=embeds,
                                  attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **layout)

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, inputs: Mapping[str, Any],
                 modalities: Sequence[Sequence[str]] | None, *, max_new_tokens: int | None = None, stop_ids: set[int],
                 allowed_vocab: int, pad_id: int, options: GenerationOptions | None = None, tokenizer: Any = None,
                 streamer: Any = None) -> list[list[int]]:
        """Decode through the LLM's own ``generate`` from the prompts' embeddings (left-padded rows).

        ``options`` picks greedy (default), sampling or beams (``max_new_tokens`` overrides its
        length). Tokens at or above ``allowed_vocab`` (mmkit's markers, and any vocabulary padding
        rows) are suppressed, so never produced. ``tokenizer`` is needed for stop strings;
        ``streamer`` (one row only) receives tokens as they come. ``modalities``: each row's
        modalities (its LoRA route). Returns each row's new tokens up to,
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
        if self.lora is not None and modalities is not None:
            # transformers repeats each row once per beam, next to itself: route the copies alike
            self.lora.route(modalities, input_ids.device, repeat=options.num_beams)
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


def _partitioned(module: nn.Module) -> bool:
    """Whether ``module``'s parameters are ZeRO-3 partitions (gathered collectively in forward)."""
    param = next(module.parameters(), None)
    return param is not None and hasattr(param, "ds_id")


def _batch_size(batch: Any) -> int | None:
    """Inputs in a collated batch, where it can be told (``None``: an object that does not say)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, RaggedFeatures):
        return batch.batch_size
    graphs = getattr(batch, "num_graphs", None)
    if isinstance(graphs, int):
        return graphs
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return len(batch)
    return None


def split_batch(batch: Any, size: int) -> list[Any] | None:
    """``batch`` in consecutive chunks of ``size`` inputs, or ``None`` when it is no larger or cannot be
    split safely. Splittable: a tensor, or a tuple / named tuple / list / dict of such whose every
    tensor leaf holds one row per input (the same first dimension); anything else (a torch-geometric
    batch, inputs laid end to end with their counts) is encoded whole."""
    leaves: list[torch.Tensor] = []

    def collect(obj: Any) -> bool:
        if isinstance(obj, torch.Tensor):
            leaves.append(obj)
            return obj.dim() > 0
        if isinstance(obj, (tuple, list)):
            return all(collect(o) for o in obj)
        if isinstance(obj, dict):
            return all(collect(o) for o in obj.values())
        return False

    if not collect(batch) or not leaves or len({int(t.shape[0]) for t in leaves}) != 1:
        return None
    rows = int(leaves[0].shape[0])
    if rows <= size:
        return None

    def take(obj: Any, start: int) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj[start:start + size]
        if isinstance(obj, tuple):
            parts = [take(o, start) for o in obj]
            return type(obj)(*parts) if hasattr(obj, "_fields") else tuple(parts)
        if isinstance(obj, list):
            return [take(o, start) for o in obj]
        return {k: take(v, start) for k, v in obj.items()}

    return [take(batch, start) for start in range(0, rows, size)]


def _values(features: Any) -> torch.Tensor:
    return features.values if isinstance(features, RaggedFeatures) else features


def _concat(parts: Sequence[Any]) -> Any:
    """Encoder outputs of consecutive chunks of one batch, as one output."""
    if isinstance(parts[0], RaggedFeatures):
        seps = None if parts[0].separators is None else torch.cat([p.separators for p in parts])
        return RaggedFeatures(torch.cat([p.values for p in parts]), [c for p in parts for c in p.counts], seps)
    return torch.cat(list(parts))


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

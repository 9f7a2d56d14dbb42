"""Generation with a trained (or in-training) model, through the same prompt builder as training."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from mmkit.data.batching import Collator, collate_fns, floating_leaves, input_counters, make_preprocessor
from mmkit.records import USER, Sample, Turn, canonical_placeholders, placeholder_order
from mmkit.errors import InputError, MmkitError
from mmkit.generation import GenerationOptions
from mmkit.modeling.assemble import Assembled
from mmkit.plugins import PluginHost, get_host
from mmkit.specs import resolve

#: What one modality input may be: a file path, the file's bytes, or the decoded value itself (what
#: the modality's loader returns: a PIL image, an array, a tensor, ...).
Input = Any
_PATHS = (str, os.PathLike)
_BYTES = (bytes, bytearray, memoryview)


def as_input_list(value: Input | Sequence[Input]) -> list[Input]:
    """One input or a list of them -> a list. A path string, bytes or an array is one input (a
    string is never iterated character by character); lists and tuples hold several."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is None and isinstance(getattr(value, "size", None), tuple):  # PIL: (width, height)
        shape = value.size
    return f"<in-memory {type(value).__name__}{' ' + str(tuple(shape)) if shape is not None else ''}>"


class LoadedModel:
    """A model ready to answer: ``generate("What digit is shown?", {"image": "a.png"})``."""

    def __init__(self, assembled: Assembled, host: PluginHost | None = None):
        host = host or get_host()
        self.assembled = assembled
        self.model = assembled.model
        self.prompts = assembled.prompts
        self.tokenizer = assembled.tokenizer
        self.specs = {m: host.modality(m) for m in self.model.modalities}
        self.markers = {m: spec.markers for m, spec in self.specs.items()}
        self.loaders = {m: resolve(spec.load) for m, spec in self.specs.items()}
        self.preprocess = {
            m: make_preprocessor(self.loaders[m], self.model.encoders[m].preprocess) for m in self.model.modalities
        }
        self.adapters = self.model.lora.adapters if self.model.lora is not None else []
        #: slots per input of each variable-size modality (the prompt reserves exactly that many)
        self.counters = input_counters(self.model.encoders, self.model.projectors)

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.model.modalities

    def _with_placeholders(self, text: str, inputs: Mapping[str, Sequence[Any]]) -> str:
        """The question with placeholder aliases rewritten (as the readers do for training) and a
        placeholder prepended for every input it does not already mark (as LLaVA's chat does), so
        ``generate("What is this?", {"image": [...]})`` just works."""
        text = canonical_placeholders(text, self.markers.values())
        prefix = ""
        for modality, items in inputs.items():
            self._check_modality(modality, items)
            missing = len(items) - text.count(self.markers[modality].placeholder)
            prefix += (self.markers[modality].placeholder + "\n") * max(missing, 0)
        return prefix + text

    def _check_modality(self, modality: str, items: Sequence[Any]) -> None:
        if modality not in self.markers:
            where = str(items[0]) if items and isinstance(items[0], _PATHS) else modality
            raise InputError(where, f"the model has no {modality!r} modality (it has: {', '.join(self.modalities)})")

    # -- inputs ----------------------------------------------------------------------------------
    def prepare(self, modality: str, value: Input) -> torch.Tensor:
        """One input -> the encoder's input tensor: a path is loaded by the modality's loader; bytes
        are the content of a file (written to a temporary file for the loader); anything else is
        taken as the loaded value and goes to the encoder's ``preprocess`` directly."""
        self._check_modality(modality, [value])
        if isinstance(value, _PATHS):
            return self.preprocess[modality](Path(value))
        if isinstance(value, _BYTES):
            return self._from_bytes(modality, bytes(value))
        where = _describe(value)
        try:
            tensor = self.model.encoders[modality].preprocess(value)
        except MmkitError:
            raise
        except Exception as exc:  # the encoder's own complaint, with what was passed
            raise InputError(where, f"the {modality} encoder cannot use it: {type(exc).__name__}: {exc}") from None
        floats = floating_leaves(tensor)  # a tensor, or any item the encoder's collate takes
        if not floats or not all(bool(torch.isfinite(t).all()) for t in floats):
            raise InputError(where, "preprocessing produced NaN or inf values (or no tensor)")
        return tensor

    def _from_bytes(self, modality: str, data: bytes) -> torch.Tensor:
        if not data:
            raise InputError(f"<{modality} bytes>", "empty (0 bytes)")
        # Loaders read files; some pick the format by suffix, so try the modality's file types in turn.
        suffixes = list(self.specs[modality].file_types) or [""]
        errors = []
        with tempfile.TemporaryDirectory(prefix="mmkit-input-") as tmp:
            for suffix in suffixes:
                path = Path(tmp) / f"input{suffix}"
                path.write_bytes(data)
                try:
                    return self.preprocess[modality](path)
                except InputError as exc:
                    errors.append(f"as {suffix or 'a file'}: {exc.reason}")
        raise InputError(f"<{modality} bytes, {len(data)}>", "not readable " + "; ".join(errors[:3]))

    # -- answering -------------------------------------------------------------------------------
    def generate(self, question: str | Sequence[Turn], inputs: Mapping[str, Input | Sequence[Input]] | None = None,
                 *, system: str | None = None, max_new_tokens: int | None = None,
                 options: GenerationOptions | None = None, streamer: Any = None, **decoding: Any) -> str:
        """Answer ``question`` about ``inputs``.

        - ``question``: the user's text, or a whole conversation (``Turn`` list ending with a user
          turn). Inputs the text does not mark with their placeholder get one prepended; placeholder
          aliases are rewritten, and inputs taken in placeholder order, as training reads its data.
        - ``inputs``: ``{modality: input or [inputs]}``; an input is a file path (``str`` or
          ``Path``, never iterated), the bytes of a file, or an in-memory value the modality's
          encoder takes (a PIL image, a numpy array, a torch tensor, ...).
        - Decoding (see :class:`mmkit.generation.GenerationOptions`): greedy by default;
          ``sample=True`` with ``temperature``, ``top_p``, ``top_k``; ``num_beams``;
          ``repetition_penalty``; ``stop`` strings; ``max_new_tokens``; ``seed``. Pass them as
          keywords or as ``options``.
        - ``streamer``: a transformers streamer (e.g. ``TextIteratorStreamer``) fed tokens as they
          come.

        Example: ``mmkit.load("runs/demo").generate("What digit is shown?", {"image": "4.png"},
        sample=True, temperature=0.7)``.
        """
        options = _options(options or GenerationOptions(**decoding), max_new_tokens)
        given = {m: as_input_list(v) for m, v in (inputs or {}).items()}
        given = {m: v for m, v in given.items() if v}
        if isinstance(question, str):
            turns: Sequence[Turn] = (Turn(USER, self._with_placeholders(question, given)),)
        else:
            turns = [Turn(t.role, canonical_placeholders(t.text, self.markers.values())) for t in question]
            for modality, items in given.items():
                self._check_modality(modality, items)
        # inputs in placeholder order, as the readers give them to training: the first one routes
        # the prompt to its adapter, whatever order the caller listed them in
        given = {m: given[m] for m in placeholder_order(given, turns, self.markers)}
        tensors = {m: [self.prepare(m, v) for v in items] for m, items in given.items()}
        item = self._item("prompt", turns, system, tensors, tuple(given))
        return self._answer([item], options, streamer=streamer)[0]

    def generate_batch(self, samples: Sequence[Sample], *, max_new_tokens: int | None = None,
                       ablate: Collection[str] = (), options: GenerationOptions | None = None) -> list[str]:
        """Answer each sample's conversation (all turns up to the last user turn), in one batch.
        Modalities in ``ablate`` get blank (all-zero) inputs instead of their files. Greedy unless
        ``options`` says otherwise."""
        options = _options(options or GenerationOptions(), max_new_tokens)
        items = []
        for sample in samples:
            tensors = {}
            for m, paths in sample.inputs.items():
                if m in ablate:
                    tensors[m] = [self.model.encoders[m].blank_item() for _ in paths]
                else:
                    tensors[m] = [self.preprocess[m](Path(p)) for p in paths]
            items.append(self._item(sample.id, sample.turns, sample.system, tensors, sample.modalities))
        return self._answer(items, options)

    def _item(self, item_id: str, turns: Sequence[Turn], system: str | None, tensors: dict[str, list[torch.Tensor]],
              modalities: Sequence[str]) -> dict[str, Any]:
        turns = list(turns)
        while turns and turns[-1].role != USER:
            turns.pop()
        counts = {m: [self.counters[m].of_item(t) for t in tensors[m]] for m in tensors if m in self.counters}
        encoded = self.prompts.encode_prompt(turns, system, input_tokens=counts) if counts else \
            self.prompts.encode_prompt(turns, system)
        return {"id": item_id, "input_ids": encoded.input_ids, "labels": encoded.labels, "inputs": tensors,
                "modalities": tuple(modalities)}

    def _answer(self, items: list[dict[str, Any]], options: GenerationOptions, *, streamer: Any = None) -> list[str]:
        batch = Collator(pad_id=self.tokenizer.pad_token_id, padding_side="left",
                         collate=collate_fns(self.model.encoders))(items)
        was_training = self.model.training
        self.model.eval()
        try:
            sequences = self.model.generate(
                batch.input_ids, batch.attention_mask, batch.inputs, batch.modalities, options=options,
                stop_ids=set(self.prompts.stop_token_ids), allowed_vocab=self.assembled.first_new_token_id,
                pad_id=self.tokenizer.pad_token_id, tokenizer=self.tokenizer, streamer=streamer)
        finally:
            self.model.train(was_training)
        answers = [self.tokenizer.decode(seq, skip_special_tokens=True) for seq in sequences]
        return [_cut_at_stop(a, options.stop).strip() for a in answers]


def _options(options: GenerationOptions, max_new_tokens: int | None) -> GenerationOptions:
    """``options`` with ``max_new_tokens`` (when given) in place of its own."""
    return options if max_new_tokens is None else attrs.evolve(options, max_new_tokens=max_new_tokens)


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = min((text.index(s) for s in stops if s in text), default=len(text))
    return text[:cut]


def load(output_dir: str | Path, *, host: PluginHost | None = None, allow_different_base: bool = False
         ) -> LoadedModel:
    """Rebuild a trained model from its output directory on top of its base models.
    ``allow_different_base``: accept a base LLM of the same shapes whose weights, tokenizer or chat
    template differ from the one it was trained on (a deliberate swap; refused otherwise)."""
    from mmkit.modeling.persistence import load_model

    host = host or get_host()
    assembled = load_model(Path(output_dir), host, allow_base_mismatch=allow_different_base)
    return LoadedModel(assembled, host)

"""Generation with a trained (or in-training) model, through the same prompt builder as training."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any


from mmkit.data.batching import Collator, make_preprocessor
from mmkit.data.records import USER, Sample, Turn
from mmkit.errors import InputError
from mmkit.modeling.builder import Assembled
from mmkit.modeling.lora import route_for_sample
from mmkit.plugins import PluginHost, get_host
from mmkit.specs import resolve


class MultimodalModel:
    """A model ready to answer: ``generate("What digit is shown?", {"image": ["a.png"]})``."""

    def __init__(self, assembled: Assembled, host: PluginHost | None = None):
        host = host or get_host()
        self.assembled = assembled
        self.model = assembled.model
        self.prompts = assembled.prompts
        self.tokenizer = assembled.tokenizer
        self.markers = {m: host.modality(m).markers for m in self.model.modalities}
        self.preprocess = {
            m: make_preprocessor(resolve(host.modality(m).load), self.model.encoders[m].preprocess)
            for m in self.model.modalities
        }
        self.adapters = self.model.lora.adapters if self.model.lora is not None else []

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.model.modalities

    def _with_placeholders(self, text: str, inputs: Mapping[str, Sequence[Any]]) -> str:
        """Prepend a placeholder for every input the question does not already mark (as LLaVA's
        chat does), so ``generate("What is this?", {"image": [...]})`` just works."""
        prefix = ""
        for modality, items in inputs.items():
            if modality not in self.markers:
                raise InputError(str(items[0]) if items else modality,
                                 f"the model has no {modality!r} modality (it has: {', '.join(self.modalities)})")
            missing = len(items) - text.count(self.markers[modality].placeholder)
            prefix += (self.markers[modality].placeholder + "\n") * max(missing, 0)
        return prefix + text

    def generate(self, question: str | Sequence[Turn], inputs: Mapping[str, Sequence[str | Path]] | None = None, *,
                 system: str | None = None, max_new_tokens: int = 32) -> str:
        inputs = {m: list(v) for m, v in (inputs or {}).items() if v}
        if isinstance(question, str):
            turns: Sequence[Turn] = (Turn(USER, self._with_placeholders(question, inputs)),)
        else:
            turns = question
        sample = Sample(id="prompt", turns=tuple(turns), inputs={m: tuple(map(str, v)) for m, v in inputs.items()},
                        system=system)
        return self.generate_batch([sample], max_new_tokens=max_new_tokens)[0]

    def generate_batch(self, samples: Sequence[Sample], *, max_new_tokens: int = 32,
                       ablate: Collection[str] = ()) -> list[str]:
        """Answer each sample's conversation (all turns up to the last user turn). Modalities in
        ``ablate`` get blank (all-zero) inputs instead of their files."""
        items = []
        for sample in samples:
            turns = list(sample.turns)
            while turns and turns[-1].role != USER:
                turns.pop()
            encoded = self.prompts.encode_prompt(turns, sample.system)
            tensors = {}
            for m, paths in sample.inputs.items():
                if m in ablate:
                    tensors[m] = [self.model.encoders[m].blank_input(1)[0] for _ in paths]
                else:
                    tensors[m] = [self.preprocess[m](Path(p)) for p in paths]
            items.append({"id": sample.id, "input_ids": encoded.input_ids, "labels": encoded.labels,
                          "inputs": tensors, "adapter": route_for_sample(sample.modalities, self.adapters or ["-"])})
        batch = Collator(pad_id=self.tokenizer.pad_token_id, padding_side="left")(items)
        was_training = self.model.training
        self.model.eval()
        try:
            sequences = self.model.generate(
                batch["input_ids"], batch["attention_mask"], batch["inputs"],
                batch["adapters"] if self.adapters else None, max_new_tokens=max_new_tokens,
                stop_ids=set(self.prompts.stop_token_ids), allowed_vocab=self.assembled.first_new_token_id,
                pad_id=self.tokenizer.pad_token_id)
        finally:
            self.model.train(was_training)
        return [self.tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in sequences]


def load(output_dir: str | Path, *, host: PluginHost | None = None) -> MultimodalModel:
    """Rebuild a trained model from its output directory on top of its base models."""
    from mmkit.modeling.persistence import load_model

    host = host or get_host()
    assembled = load_model(Path(output_dir), host)
    return MultimodalModel(assembled, host)

"""The baseline mmkit's step is measured against: a plain LLaVA-style training loop.

What a 300-line script does, written independently of mmkit's training code: the batch holds one
placeholder token per input (as LLaVA's data has), padded to the longest; every step encodes
every input with the frozen encoder, then splices the projected features into each sample's text
embeddings one sample at a time (LLaVA's ``prepare_inputs_labels_for_multimodal``), pads the spliced
sequences to the longest again, and runs the LLM; torch AdamW with gradient clipping, no DeepSpeed.

It trains the *same* modules (encoders, projectors, marker embeddings, LLM with the same LoRA) on
the same records and batches, so the sequences, token counts and losses equal mmkit's: only the
way the step is organised differs (``tests/test_bench.py`` checks that the losses match).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from mmkit.prompt import IGNORE_INDEX


class PlainLlavaLoop:
    def __init__(self, model: Any, *, pad_id: int, param_groups: list[dict[str, Any]], weight_decay: float,
                 max_grad_norm: float, device: torch.device, num_workers: int = 0,
                 schedule: Callable[[Any], Any] | None = None):
        self.model = model
        self.pad_id = pad_id
        self.placeholders = dict(model.placeholder_ids)  # modality -> placeholder token id
        self._tokens_per_input = {tok: int(model.projectors[m].num_output_tokens) for m, tok in self.placeholders.items()}
        self.params = [p for group in param_groups for p in group["params"]]
        self.optimizer = torch.optim.AdamW(param_groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
        self.scheduler = schedule(self.optimizer) if schedule is not None else None
        self.max_grad_norm = max_grad_norm
        self.device = device
        self.num_workers = num_workers

    # -- data: one placeholder per input, pad to longest ------------------------------------------
    def collapse(self, input_ids: Sequence[int], labels: Sequence[int]) -> tuple[list[int], list[int]]:
        """mmkit's prompt holds ``T`` placeholder slots per input; LLaVA's holds one."""
        ids, labs, run = [], [], 0
        for token, label in zip(input_ids, labels, strict=True):
            per_input = self._tokens_per_input.get(token)
            if per_input is None:
                run = 0
            else:
                run += 1
                if (run - 1) % per_input:
                    continue  # a later slot of the same input
            ids.append(token)
            labs.append(label)
        return ids, labs

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        rows = [self.collapse(item["input_ids"], item["labels"]) for item in items]
        longest = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.bool)
        for i, (ids, labs) in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            labels[i, :len(labs)] = torch.tensor(labs)
            mask[i, :len(ids)] = True
        inputs: dict[str, list[Any]] = {}  # preprocessed items, batched by each encoder's collate
        for item in items:
            for modality, tensors in item["inputs"].items():
                inputs.setdefault(modality, []).extend(tensors)
        # after the splice: the same sequences as mmkit's (for counting tokens alike)
        lengths = [len(item["input_ids"]) for item in items]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask,
                "num_tokens": sum(lengths), "num_slots": len(items) * max(lengths),
                "inputs": {m: self.stock_input(m, self.model.encoders[m].collate(t)) for m, t in inputs.items()},
                "modalities": [item["modalities"] for item in items], "ids": [item["id"] for item in items]}

    def stock_input(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """What a stock encoder takes. An encoder whose ``preprocess`` also does weight-free work that
        stock implementations do in every forward (sampling, grouping) offers ``stock_input(batch)``:
        the batch without that work, which its forward then does itself. The baseline feeds that, so
        it keeps paying what a plain script pays."""
        stock = getattr(self.model.encoders[modality], "stock_input", None)
        return stock(x).contiguous() if callable(stock) else x

    def loader(self, dataset: Any, batches: Sequence[Sequence[int]]) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(dataset, batch_sampler=[list(b) for b in batches], collate_fn=self.collate,
                                           num_workers=self.num_workers)

    # -- model: encode every step, splice per sample, pad to longest --------------------------------
    def features(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for modality, x in inputs.items():
            encoder = self.model.encoders[modality]
            with torch.no_grad():
                feats = encoder(x.to(self.device))
            out[modality] = self.model.projectors[modality](feats)
        return out

    def splice(self, batch: dict[str, Any], features: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LLaVA's per-sample splice: ``(inputs_embeds, attention_mask, labels)``."""
        embed = self.model.embeddings
        modality_of = {tok: m for m, tok in self.placeholders.items()}
        used = dict.fromkeys(features, 0)
        seqs, labs = [], []
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
            ids, labels = ids[mask].to(self.device), labels[mask].to(self.device)
            where = [i for i, tok in enumerate(ids.tolist()) if tok in modality_of]
            pieces, piece_labels, start = [], [], 0
            for pos in where:
                modality = modality_of[int(ids[pos])]
                feat = features[modality][used[modality]]
                used[modality] += 1
                text = embed(ids[start:pos].unsqueeze(0))[0]
                pieces += [text, feat.to(text.dtype)]
                piece_labels += [labels[start:pos], labels.new_full((feat.shape[0],), IGNORE_INDEX)]
                start = pos + 1
            pieces.append(embed(ids[start:].unsqueeze(0))[0])
            piece_labels.append(labels[start:])
            seqs.append(torch.cat(pieces))
            labs.append(torch.cat(piece_labels))
        longest = max(s.shape[0] for s in seqs)
        hidden = seqs[0].shape[-1]
        embeds = seqs[0].new_zeros(len(seqs), longest, hidden)
        labels_out = torch.full((len(seqs), longest), IGNORE_INDEX, dtype=torch.long, device=self.device)
        attention = torch.zeros((len(seqs), longest), dtype=torch.long, device=self.device)
        for i, (seq, lab) in enumerate(zip(seqs, labs, strict=True)):
            embeds[i, :seq.shape[0]] = seq
            labels_out[i, :lab.shape[0]] = lab
            attention[i, :seq.shape[0]] = 1
        return embeds, attention, labels_out

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.model.lora is not None:
            self.model.lora.route(batch["modalities"], self.device)
        embeds, attention, labels = self.splice(batch, self.features(batch["inputs"]))
        return self.model.llm(inputs_embeds=embeds, attention_mask=attention, labels=labels, use_cache=False).loss

    def update(self) -> None:
        """The optimizer step after ``loss(batch).backward()``."""
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

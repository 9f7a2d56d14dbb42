"""Multiple choice by likelihood: each option is scored as the assistant's answer to the prompt,
through the training prompt builder, and the most likely wins.

An option's score is, by default, the summed log-probability of its answer tokens, end-of-turn
token included (the tokens training puts a loss on): ``log P(option, then stop | prompt)``, so "2"
does not win by being the start of "23". That is not ChEF's "perplexity" (PPL) inferencer, which
ranks options by the MEAN log-probability per token (lowest per-token loss): a long option is not
penalised for its length there. ``mean=True`` (a recipe's ``choice_score: mean``) ranks that way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmkit.records import ASSISTANT, USER, Sample, Turn


def _answer_turns(sample: Sample, option: str) -> tuple[Turn, ...]:
    turns = list(sample.turns)
    while turns and turns[-1].role != USER:
        turns.pop()
    return (*turns, Turn(ASSISTANT, option))


def option_log_likelihoods(model: Any, sample: Sample, options: Sequence[str], *, mean: bool = False) -> list[float]:
    """``model`` is a :class:`mmkit.inference.LoadedModel`; one forward pass for all options."""
    return batch_log_likelihoods(model, [(sample, options)], mean=mean)[0]


def batch_log_likelihoods(model: Any, questions: Sequence[tuple[Sample, Sequence[str]]], *,
                          mean: bool = False) -> list[list[float]]:
    """Every option of every question scored in one padded batch (one row per option): the sum of
    its tokens' log-probabilities, or with ``mean`` their mean (ChEF's PPL ranking)."""
    import torch

    from mmkit.data.batching import Collator, collate_fns
    from mmkit.prompt import IGNORE_INDEX

    items = []
    for sample, options in questions:
        inputs = {m: [model.preprocess[m](Path(p)) for p in paths] for m, paths in sample.inputs.items()}
        counts = {m: [model.counters[m].of_item(t) for t in inputs[m]] for m in inputs if m in model.counters}
        for option in options:
            answered = Sample(id=sample.id, turns=_answer_turns(sample, option), inputs=sample.inputs,
                              system=sample.system, source=sample.source, index=sample.index)
            encoded = model.prompts.encode_sample(answered, input_tokens=counts) if counts else \
                model.prompts.encode_sample(answered)
            items.append({"id": sample.id, "input_ids": encoded.input_ids, "labels": encoded.labels,
                          "inputs": inputs, "modalities": tuple(sample.modalities)})
    batch = Collator(pad_id=model.tokenizer.pad_token_id, collate=collate_fns(model.model.encoders))(items)
    net = model.model
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(**batch.model_kwargs())
    finally:
        net.train(was_training)
    # with labels, the forward returns logits at the supervised positions only, in batch order
    # (mmkit.modeling.loss): here each option's answer tokens
    labels = batch.labels[:, 1:]
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(out.logits.float(), dim=-1).gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
    rows = mask.nonzero()[:, 0].to(logp.device)
    sums = logp.new_zeros(labels.shape[0]).index_add_(0, rows, logp)
    if mean:
        sums = sums / logp.new_zeros(labels.shape[0]).index_add_(0, rows, torch.ones_like(logp)).clamp(min=1)
    flat = [float(v) for v in sums]
    out_scores, start = [], 0
    for _, options in questions:
        out_scores.append(flat[start:start + len(options)])
        start += len(options)
    return out_scores


def best(scores: Sequence[float]) -> int:
    """Index of the most likely option (the first on a tie)."""
    return max(range(len(scores)), key=lambda k: (scores[k], -k))

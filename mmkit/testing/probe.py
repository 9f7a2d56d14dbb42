"""The frozen-encoder trap, measured: can a linear classifier separate the demo's classes from the
frozen encoder's features? If not, no projector or LoRA on the LLM will learn the demo either (the
encoder is frozen), so the training run would fail slowly instead of this test failing fast."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs


@attrs.frozen
class ProbeResult:
    train_accuracy: float
    test_accuracy: float
    chance: float
    classes: tuple[str, ...]


def demo_examples(records: Sequence[dict[str, Any]], key: str, root: Path) -> list[tuple[Path, str]]:
    """``(input file, answer)`` of each demo record (its last answer is the class label)."""
    out = []
    for rec in records:
        value = rec[key]
        path = value[0] if isinstance(value, list) else value
        out.append((Path(root) / path, str(rec["conversations"][-1]["value"]).strip()))
    return out


def linear_probe(encoder: Any, load: Callable[[Path], Any], train: Sequence[tuple[Path, str]],
                 test: Sequence[tuple[Path, str]], *, steps: int = 300, lr: float = 0.05, weight_decay: float = 0.01,
                 batch_size: int = 32, seed: int = 0) -> ProbeResult:
    """Fit a linear classifier on the frozen encoder's token features of ``train``, pooled to their
    mean and standard deviation over tokens (the mean alone averages away what differs between
    tokens) and standardised, and report its accuracy on ``test``. Seeded; seconds on CPU."""
    import torch

    from mmkit.modeling import seeded
    from mmkit.modeling.features import RaggedFeatures

    def features(examples: Sequence[tuple[Path, str]]) -> torch.Tensor:
        rows = []
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                chunk = examples[start:start + batch_size]
                out = encoder(encoder.collate([encoder.preprocess(load(path)) for path, _ in chunk]))
                # one [n_i, D] tensor per input (a variable-size encoder's inputs differ in n_i)
                per_input = out.split() if isinstance(out, RaggedFeatures) else list(out)
                rows += [torch.cat([t.float().mean(dim=0), t.float().std(dim=0, unbiased=False)]) for t in per_input]
        return torch.stack(rows)

    classes = tuple(sorted({label for _, label in [*train, *test]}))
    index = {c: i for i, c in enumerate(classes)}
    x_train, x_test = features(train), features(test)
    y_train = torch.tensor([index[label] for _, label in train])
    y_test = torch.tensor([index[label] for _, label in test])
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    with seeded(seed):
        head = torch.nn.Linear(x_train.shape[1], len(classes))
        opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(x_train), y_train).backward()
            opt.step()
    with torch.no_grad():
        train_acc = float((head(x_train).argmax(1) == y_train).float().mean())
        test_acc = float((head(x_test).argmax(1) == y_test).float().mean())
    counts = torch.bincount(y_test, minlength=len(classes))
    return ProbeResult(train_acc, test_acc, float(counts.max()) / max(1, len(test)), classes)

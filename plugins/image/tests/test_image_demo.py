"""The digits demo: its records, and that the frozen random-init demo encoder keeps the digits
readable (the lead's demo trains only a projector + LoRA on top of it)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mmkit.specs import DemoTask
from mmkit_plugin_image.demo import ANSWERS, QUESTIONS, build_demo, load_digits
from mmkit_plugin_image.io import load_image


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoTask, float]:
    root = tmp_path_factory.mktemp("digits")
    start = time.perf_counter()
    task = build_demo(root, seed=0)
    return root, task, time.perf_counter() - start


def _label(record) -> int:
    return int(record["conversations"][1]["value"])


def test_split_sizes_balance_and_format(demo) -> None:
    root, task, seconds = demo
    assert (len(task.train), len(task.test)) == (1497, 300)
    assert task.answers == ANSWERS and task.chance == 0.1 and task.metric == "accuracy"
    assert Counter(_label(r) for r in task.test) == {d: 30 for d in range(10)}
    ids = [r["id"] for r in task.train + task.test]
    assert len(set(ids)) == 1797 and all(i.startswith("digit-") for i in ids)
    questions = set()
    for r in task.train + task.test:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"] in ANSWERS
        assert not Path(r["image"]).is_absolute() and (root / r["image"]).is_file()
        questions.add(human["value"])
    assert len(questions) == len(QUESTIONS)


def test_images_hold_the_dataset_pixels(demo) -> None:
    root, task, _ = demo
    pixels, labels = load_digits()
    assert pixels.shape == (1797, 8, 8) and pixels.max() == 16 and sorted(set(labels.tolist())) == list(range(10))
    for record in task.test[:20]:
        i = int(record["id"].split("-")[1])
        img = np.asarray(load_image(root / record["image"]))
        assert img.shape == (8, 8, 3) and _label(record) == labels[i]
        assert np.array_equal(img[..., 0], np.rint(pixels[i].astype(float) * 255 / 16).astype(np.uint8))


def test_deterministic_given_the_seed(demo, tmp_path: Path) -> None:
    _, task, _ = demo
    again = build_demo(tmp_path / "a", seed=0)
    other = build_demo(tmp_path / "b", seed=1)
    assert again == task
    assert [r["id"] for r in other.test] != [r["id"] for r in task.test]
    # The files do not depend on the seed, only the split and wording do.
    assert (tmp_path / "a/digits/digit-0005.png").read_bytes() == (tmp_path / "b/digits/digit-0005.png").read_bytes()


def _features(encoder, root: Path, records) -> torch.Tensor:
    x = torch.stack([encoder.preprocess(load_image(root / r["image"])) for r in records])
    with torch.no_grad():
        return encoder(x)


def _probe_accuracy(train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, y_test: torch.Tensor) -> float:
    """Multinomial logistic regression (L-BFGS, small L2) on standardised features."""
    with _one_thread():
        return _fit_probe(train, y_train, test, y_test)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # L-BFGS does thousands of tiny vector ops; on a busy 2-core box OpenMP's thread hand-offs made
    # them 10-20x slower than one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit_probe(train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, y_test: torch.Tensor) -> float:
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    torch.manual_seed(0)
    linear = torch.nn.Linear(train.shape[1], 10)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=200, history_size=10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train), y_train) + 1e-3 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((linear(test).argmax(1) == y_test).float().mean())


def test_frozen_demo_features_keep_the_digits(demo) -> None:
    from mmkit.modeling.components import build_encoder
    from mmkit.plugins import PluginHost

    root, task, _ = demo
    host = PluginHost()
    torch.manual_seed(1234)  # the seeded init must not depend on the caller's RNG
    encoder = build_encoder(host, host.modality("image")).eval()  # exactly what the demo trains on
    assert encoder.num_tokens <= 16
    f_train, f_test = _features(encoder, root, task.train), _features(encoder, root, task.test)
    y_train = torch.tensor([_label(r) for r in task.train])
    y_test = torch.tensor([_label(r) for r in task.test])

    flat = _probe_accuracy(f_train.flatten(1), y_train, f_test.flatten(1), y_test)
    pooled = _probe_accuracy(f_train.mean(1), y_train, f_test.mean(1), y_test)
    # Control: the same probe on shuffled training labels must stay near chance.
    shuffled = y_train[torch.randperm(len(y_train), generator=torch.Generator().manual_seed(0))]
    control = _probe_accuracy(f_train.flatten(1), shuffled, f_test.flatten(1), y_test)
    print(f"linear probe held-out accuracy: flattened {flat:.3f}, mean-pooled {pooled:.3f}, "
          f"shuffled-label control {control:.3f}")
    assert flat >= 0.9, flat  # measured 0.977
    assert pooled >= 0.85, pooled  # measured 0.933: each token also carries global digit information
    assert control < 0.3, control

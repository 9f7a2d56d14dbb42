"""The demo task, LAMM-style records, and the proof that frozen demo features are informative."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from mmkit.records import ReadContext, parse_record
from mmkit.modeling.components import build_encoder
from mmkit.plugins import PluginHost
from mmkit.specs import resolve
from mmkit_plugin_pointcloud.demo import build_demo
from mmkit_plugin_pointcloud.io import load_point_cloud


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("demo")
    start = time.perf_counter()
    task = build_demo(root, seed=0)
    return root, task, time.perf_counter() - start


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_demo_shape_balance(demo) -> None:
    from mmkit_plugin_pointcloud.demo import TEST_PER_CLASS, TRAIN_PER_CLASS

    root, task, _seconds = demo
    assert len(task.train) == 5 * TRAIN_PER_CLASS and len(task.test) == 5 * TEST_PER_CLASS
    assert set(task.answers) == {"sphere", "cube", "cylinder", "cone", "torus"}
    for split, size in ((task.train, TRAIN_PER_CLASS), (task.test, TEST_PER_CLASS)):
        assert Counter(r["conversations"][1]["value"] for r in split) == {a: size for a in task.answers}
    ids = [r["id"] for r in task.train + task.test]
    assert len(set(ids)) == len(ids) and ids[0] == "shape-0001"
    suffixes = Counter(Path(r["pointcloud"]).suffix for r in task.train + task.test)
    assert set(suffixes) == {".npy", ".ply", ".xyz"}
    assert all(r["conversations"][0]["value"].startswith("<pointcloud>\n") for r in task.train)


def test_demo_is_deterministic(demo, tmp_path: Path) -> None:
    root, task, _ = demo
    again = build_demo(tmp_path, seed=0)
    assert again == task and _digest(tmp_path) == _digest(root)
    other = build_demo(tmp_path / "other", seed=1)
    assert _digest(tmp_path / "other") != _digest(root) and other.answers == task.answers


def test_lamm_records_use_pcl_key_and_placeholder(tmp_path: Path) -> None:
    import numpy as np

    np.save(tmp_path / "chair_4096.npy", np.random.default_rng(0).random((4096, 6)).astype(np.float32))
    host = PluginHost()
    record = {"pcl": "chair_4096.npy", "task_type": "classification3d", "src_dataset": "ShapeNet",
              "conversations": [{"from": "human", "value": "<pcl>\nWhat is this object?"},
                                {"from": "gpt", "value": "A chair."}]}
    ctx = ReadContext(modalities=host.modalities(), data_root=tmp_path, check_files=True)
    sample = parse_record(record, ctx=ctx, base=tmp_path, source="lamm", index=0)
    assert sample.inputs["pointcloud"] == (str(tmp_path / "chair_4096.npy"),)
    assert sample.turns[0].text.startswith("<pointcloud>\n")
    assert load_point_cloud(Path(sample.inputs["pointcloud"][0])).shape == (4096, 6)


def _probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                    test_y: torch.Tensor, classes: int) -> float:
    """Multinomial logistic regression (L2, L-BFGS) on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(0)
    linear = torch.nn.Linear(train_x.shape[1], classes)
    optimiser = torch.optim.LBFGS(linear.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train_x), train_y) + 1e-3 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        return (linear(test_x).argmax(1) == test_y).float().mean().item()


def test_frozen_demo_features_are_linearly_separable(demo) -> None:
    """The demo trains only a projector (+ LoRA) on this frozen random-init encoder, so its features
    must already separate the classes: a linear probe on mean+max pooled tokens must reach 0.9."""
    root, task, _ = demo
    host = PluginHost()
    spec = host.modality("pointcloud")
    encoder = build_encoder(host, spec).eval()  # tiny + demo options, exactly what the demo trains on
    assert encoder.num_tokens <= 16
    load = resolve(spec.load)
    answers = list(task.answers)

    def features(records) -> tuple[torch.Tensor, torch.Tensor]:
        items = [encoder.preprocess(load(root / r["pointcloud"])) for r in records]
        with torch.no_grad():
            tokens = torch.cat([encoder(encoder.collate(items[i:i + 150])) for i in range(0, len(items), 150)])
        labels = torch.tensor([answers.index(r["conversations"][1]["value"]) for r in records])
        return torch.cat([tokens.mean(1), tokens.amax(1)], dim=1), labels

    accuracy = _probe_accuracy(*features(task.train), *features(task.test), classes=len(answers))
    print(f"linear probe held-out accuracy: {accuracy:.3f}")
    assert accuracy >= 0.9

"""The demo task, and the property mmkit's demo training relies on: the frozen, random-init demo
encoder's features separate the classes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from mmkit.plugins import PluginHost

from mmkit_plugin_audio_example.demo import CLASSES, build_demo
from mmkit_plugin_audio_example.encoder import build_encoder
from mmkit_plugin_audio_example.io import load_wav


def test_demo_is_balanced_and_well_formed(tmp_path: Path) -> None:
    task = build_demo(tmp_path, seed=0)
    assert task.answers == tuple(CLASSES) and task.chance == 0.25
    assert (len(task.train), len(task.test)) == (600, 152)
    for split in (task.train, task.test):
        counts = Counter(rec["conversations"][1]["value"] for rec in split)
        assert set(counts) == set(CLASSES) and len(set(counts.values())) == 1
    ids = [rec["id"] for rec in task.train + task.test]
    assert len(set(ids)) == len(ids)
    rec = task.test[0]
    assert rec["conversations"][0]["value"].count("<audio>") == 1
    audio = load_wav(tmp_path / rec["audio"])  # paths are relative to root
    assert audio.sample_rate == 16000 and audio.duration == pytest.approx(0.5)


def test_demo_is_deterministic_given_the_seed(tmp_path: Path) -> None:
    a, b, c = (build_demo(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert a == b
    same = (tmp_path / "a" / a.train[5]["audio"]).read_bytes() == (tmp_path / "b" / b.train[5]["audio"]).read_bytes()
    differ = (tmp_path / "a" / a.train[5]["audio"]).read_bytes() != (tmp_path / "c" / c.train[5]["audio"]).read_bytes()
    assert same and differ


def test_frozen_demo_encoder_features_are_linearly_separable(tmp_path: Path) -> None:
    """A logistic regression on the raw (unnormalised) flattened features of the demo encoder,
    built exactly as mmkit builds it (tiny options, then the demo's), beats 0.9 held-out accuracy."""
    host = PluginHost()
    modality = host.modality("audio_example")
    options = {**host.encoder(modality.encoder).tiny, **modality.demo.encoder_options}
    encoder = build_encoder(pretrained=None, **options).eval()
    assert encoder.num_tokens <= 16
    task = build_demo(tmp_path, seed=0)
    labels = {name: i for i, name in enumerate(task.answers)}

    def features(records):
        x = torch.stack([encoder.preprocess(load_wav(tmp_path / r["audio"])) for r in records])
        y = torch.tensor([labels[r["conversations"][1]["value"]] for r in records])
        with torch.no_grad():
            return encoder(x).flatten(1), y

    (x_train, y_train), (x_test, y_test) = features(task.train), features(task.test)
    torch.manual_seed(0)
    probe = torch.nn.Linear(x_train.shape[1], len(labels))
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(300):  # full-batch logistic regression
        opt.zero_grad()
        torch.nn.functional.cross_entropy(probe(x_train), y_train).backward()
        opt.step()
    with torch.no_grad():
        accuracy = float((probe(x_test).argmax(1) == y_test).float().mean())
    print(f"linear probe held-out accuracy: {accuracy:.3f} (chance {task.chance:.2f})")
    assert accuracy >= 0.9

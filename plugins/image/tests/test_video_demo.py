"""The video demo: balanced records of clips whose square really moves the labelled way, variable
frame counts (so variable token counts), determinism, and frozen features that keep the motion."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mmkit.specs import DemoTask
from mmkit_plugin_image.video_demo import (ANSWERS, MAX_FRAMES, MIN_FRAMES, MIN_TRAVEL, QUESTIONS, STEPS,
                                           build_demo, make_clip, save_frame_folder)
from mmkit_plugin_image.video_io import load_video


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoTask]:
    root = tmp_path_factory.mktemp("video")
    return root, build_demo(root, seed=0)


def _answer(record) -> str:
    return record["conversations"][1]["value"]


def _centre(frame: np.ndarray) -> np.ndarray:
    grey = frame.astype(int).sum(-1)
    return np.argwhere(grey > grey.min() + 200).mean(axis=0)[::-1]  # (x, y)


def test_records(demo) -> None:
    root, task = demo
    assert (len(task.train), len(task.test)) == (800, 200) and task.answers == ANSWERS and task.chance == 0.25
    assert Counter(_answer(r) for r in task.test) == {a: 50 for a in ANSWERS}
    assert Counter(_answer(r) for r in task.train) == {a: 200 for a in ANSWERS}
    assert len({r["id"] for r in task.train + task.test}) == 1000
    wordings = set()
    for record in task.train + task.test:
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<video>\n") and gpt["value"] in ANSWERS
        assert not Path(record["video"]).is_absolute() and (root / record["video"]).is_file()
        wordings.add(human["value"])
    assert len(wordings) == len(QUESTIONS)


def test_clips_move_the_labelled_way(demo) -> None:
    root, task = demo
    lengths = Counter()
    for record in task.test:
        video = load_video(root / record["video"])
        lengths[video.num_frames] += 1
        centres = np.array([_centre(np.asarray(img)) for img in video.read(range(video.num_frames))])
        steps = np.diff(centres, axis=0)
        # A steady whole-pixel step each frame, along the labelled axis only.
        assert (steps == steps[0]).all() and np.sign(steps[0]).tolist() == list(STEPS[_answer(record)])
        assert np.abs(centres[-1] - centres[0]).sum() >= MIN_TRAVEL
    assert sorted(lengths) == list(range(MIN_FRAMES, MAX_FRAMES + 1))


def test_deterministic_given_the_seed(demo, tmp_path: Path) -> None:
    root, task = demo
    assert build_demo(tmp_path / "a", seed=0) == task
    assert (tmp_path / "a" / task.test[0]["video"]).read_bytes() == (root / task.test[0]["video"]).read_bytes()
    assert [_answer(r) for r in build_demo(tmp_path / "b", seed=1).test] != [_answer(r) for r in task.test]


def test_frame_folder_holds_the_same_clip(tmp_path: Path) -> None:
    clip = make_clip("up", np.random.default_rng(3))
    video = load_video(save_frame_folder(clip, tmp_path / "clip"))
    assert video.num_frames == len(clip)
    assert all(np.array_equal(np.asarray(img), frame) for img, frame in zip(video.read(range(len(clip))), clip))


def test_frozen_features_keep_the_motion(demo) -> None:
    """The demo encoder (frozen, random init) must keep where the square is: a linear probe on the
    last frame's features minus the first's reads the direction of held-out clips."""
    from mmkit.plugins import PluginHost
    from mmkit.modeling.components import build_encoder

    root, task = demo
    host = PluginHost()
    encoder = build_encoder(host, host.modality("video")).eval()
    assert encoder.max_frames == MAX_FRAMES and encoder.tokens_per_frame == 1

    def features(records) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        with torch.no_grad():
            for record in records:
                video = load_video(root / record["video"])
                ends = video.read([0, video.num_frames - 1])  # only the two frames the probe reads
                frames = encoder.frame_encoder(torch.stack([encoder.frame_encoder.preprocess(f) for f in ends]))
                rows.append((frames[-1] - frames[0]).flatten())
        return torch.stack(rows), torch.tensor([ANSWERS.index(_answer(r)) for r in records])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: threads only contend
    try:
        x_train, y_train = features(task.train[:200])
        x_test, y_test = features(task.test[:100])
        mean, std = x_train.mean(0), x_train.std(0) + 1e-6
        probe = torch.nn.Linear(x_train.shape[1], len(ANSWERS))
        optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=100)
        optimizer.step(lambda: loss(probe, optimizer, (x_train - mean) / std, y_train))
        accuracy = (probe((x_test - mean) / std).argmax(1) == y_test).float().mean().item()
    finally:
        torch.set_num_threads(threads)

    assert accuracy > 0.8, accuracy  # chance 0.25; measured 0.95


def loss(probe: torch.nn.Linear, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad()
    value = torch.nn.functional.cross_entropy(probe(x), y) + 1e-3 * probe.weight.square().sum()
    value.backward()
    return value

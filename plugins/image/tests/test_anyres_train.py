"""Any-resolution images end to end: a short training run on images of three aspect ratios (online,
then from the feature cache with the same losses), the saved run reloaded, answering and ablated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHAPES = {"wide": (32, 64), "tall": (48, 16), "square": (32, 32), "photo": (30, 44)}  # (height, width)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    from mmkit.demo.llm import build_tiny_llm

    root = tmp_path_factory.mktemp("anyres_train")
    llm = build_tiny_llm(root / "llm", ["What is shown here ? " + " ".join(SHAPES)], architecture="llama",
                         hidden_size=32, num_layers=1, num_heads=2)
    rng = np.random.default_rng(0)
    records = []
    for i, (name, (h, w)) in enumerate(SHAPES.items()):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{name}.png")
        records.append({"id": f"r{i}", "image": f"{name}.png",
                        "conversations": [{"from": "human", "value": "<image> What is shown here ?"},
                                          {"from": "gpt", "value": name}]})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root, llm


def _train(root: Path, llm: Path, out: Path, **extra) -> list[float]:
    from mmkit.training import recipe
    from mmkit.training.config import resolve_config

    options = {"llm": str(llm), "data": [str(root / "train.jsonl")], "modalities": ["image"], "max_steps": 2,
               "micro_batch_size": 2, "tensorboard": False, "lora_r": 4, "lora_dropout": 0.0, "log_every": 1, "seed": 0,
               "output_dir": str(out), "encoder_options": {"image": {"anyres": True, "anyres_pool": 2}}, **extra}
    summary = recipe.train(resolve_config(None, options))
    assert summary["steps"] == 2 and summary["skipped_records"] == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def test_train_cache_reload_answer_and_ablate(data, tmp_path) -> None:
    import mmkit
    from mmkit.records import Sample, Turn

    root, llm = data
    online = _train(root, llm, tmp_path / "online")
    cached = _train(root, llm, tmp_path / "cached", cache_features=str(tmp_path / "cache"))
    assert len(online) == 2 and cached == online  # separators and ragged rows survive the cache exactly

    meta = json.loads((tmp_path / "online" / "model" / "mmkit.json").read_text())
    identity = meta["modalities"]["image"]["encoder_identity"]
    assert identity["num_tokens"] is None and identity["anyres"]["pool"] == 2

    model = mmkit.load(tmp_path / "online")
    encoder = model.model.encoders["image"]
    assert encoder.anyres and model.model.projectors["image"].separator is not None
    answer = model.generate("<image> What is shown here ?", {"image": [str(root / "wide.png")]}, max_new_tokens=2)
    assert isinstance(answer, str)
    samples = [Sample(id=n, turns=(Turn("user", "<image> What is shown here ?"),), inputs={"image": (str(root / f"{n}.png"),)})
               for n in ("wide", "tall")]
    assert len(model.generate_batch(samples, max_new_tokens=2)) == 2
    assert len(model.generate_batch(samples, max_new_tokens=2, ablate=("image",))) == 2  # blank(1) per image

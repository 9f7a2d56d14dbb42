"""The embedded demo: each chosen modality's demo task (from its plugin), a few text-only samples,
and a tiny LLM and tokenizer built for that vocabulary. Everything is generated offline."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from mmkit.demo.llm import build_tiny_llm
from mmkit.errors import ConfigError
from mmkit.plugins import PluginHost
from mmkit.specs import DemoTask, resolve

# Text-only samples keep the shared LLM honest about language turns that carry no modality.
TEXT_QA = [
    ("What is two plus two?", "four"), ("What is one plus two?", "three"), ("What is one plus one?", "two"),
    ("Say hello.", "hello"), ("What colour is the sky?", "blue"), ("What colour is grass?", "green"),
    ("Is fire hot or cold?", "hot"), ("Is ice hot or cold?", "cold"),
]


@attrs.frozen
class DemoData:
    llm_dir: Path
    train_file: Path
    test_files: dict[str, Path]  # modality -> held-out file
    tasks: dict[str, DemoTask]
    text_only: int = 0  # text-only records added to the training file (said at the start of a demo run)

    def note(self) -> str:
        return (f"the demo trains on {sum(len(t.train) for t in self.tasks.values())} records of its modalities plus "
                f"{self.text_only} text-only ones (questions like {TEXT_QA[0][0]!r}) that keep the shared LLM "
                "answering turns without an input; a run on --data trains on your records only")


def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")


def _prefix_paths(records: Sequence[dict[str, Any]], keys: Sequence[str], prefix: str) -> list[dict[str, Any]]:
    out = []
    for rec in records:
        rec = dict(rec)
        for key in keys:
            if key in rec:
                value = rec[key]
                rec[key] = [f"{prefix}/{v}" for v in value] if isinstance(value, list) else f"{prefix}/{value}"
        out.append(rec)
    return out


def prepare_demo(host: PluginHost, modalities: Sequence[str], root: Path, *, seed: int = 0) -> DemoData:
    root.mkdir(parents=True, exist_ok=True)
    tasks: dict[str, DemoTask] = {}
    train: list[dict[str, Any]] = []
    test_files = {}
    for name in modalities:
        spec = host.modality(name)
        if spec.demo is None:
            raise ConfigError(f"modality {name!r} ({host.provider('modality', name)}) has no demo task; pass --data")
        task = resolve(spec.demo.build)(root / name, seed=seed)
        tasks[name] = task
        train += _prefix_paths(task.train, spec.data_keys, name)
        test_files[name] = root / f"test_{name}.jsonl"
        _write_jsonl(test_files[name], _prefix_paths(task.test, spec.data_keys, name))
    rng = random.Random(seed)
    n_text = max(16, len(train) // 20)
    train += [{"id": f"text-{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
              for i, (q, a) in enumerate(rng.choice(TEXT_QA) for _ in range(n_text))]
    rng.shuffle(train)
    train_file = root / "train.jsonl"
    _write_jsonl(train_file, train)
    corpus = [turn["value"] for rec in train for turn in rec["conversations"]]
    corpus += [turn["value"] for task in tasks.values() for rec in task.test for turn in rec["conversations"]]
    llm_dir = build_tiny_llm(root / "base_llm", corpus, seed=seed)
    return DemoData(llm_dir, train_file, test_files, tasks, text_only=n_text)

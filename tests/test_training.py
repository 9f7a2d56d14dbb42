"""End to end: the training recipe on CPU (one process: the plain torch step), saving, evaluation and
reloading.

The first DeepSpeed run in a fresh environment compiles a small op (about a minute); later runs
reuse it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mmkit
from mmkit.records import ReadContext
from mmkit.data.sources import iter_samples
from mmkit.errors import DataError
from mmkit.evaluation.evaluate import predict
from mmkit.evaluation.metrics import accuracy
from mmkit.modeling.persistence import read_meta
from mmkit.training import recipe
from mmkit.training.config import resolve_config

pytestmark = pytest.mark.slow

#: The demo modality these runs use: the smallest demo, which learns within 30 steps.
DEMO = "audio_example"
SMALL = {"modalities": [DEMO], "max_steps": 30, "micro_batch_size": 8, "eval_batch_size": 64, "log_every": 5}


@pytest.fixture(scope="module")
def demo_host(mm_host):
    if DEMO not in mm_host.modalities():
        pytest.skip(f"the {DEMO} plugin is not installed (pip install -e plugins/{DEMO})")
    return mm_host


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_host):
    out = tmp_path_factory.mktemp("demo_run")
    cfg = resolve_config(None, {**SMALL, "output_dir": str(out)})
    summary = recipe.train(cfg)
    return out, summary


def test_demo_run_writes_metrics_config_model_and_eval(demo_run):
    out, summary = demo_run
    assert summary["steps"] == 30 and summary["skipped_records"] == 0
    logs = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in logs] == [5, 10, 15, 20, 25, 30]
    for record in logs:
        assert record["loss"] > 0 and record["tokens_per_s"] > 0 and 0 <= record["padding_fraction"] < 1
    assert logs[-1]["loss"] < logs[0]["loss"]  # it learns
    assert summary["final_loss"] == pytest.approx(logs[-1]["loss"])

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["modalities"] == [DEMO] and config["max_steps"] == 30 and config["micro_batch_size"] == 8
    assert config["lora_mode"] == "shared" and config["lr"] == 5e-3  # the demo defaults, resolved
    assert config["output_dir"] == str(out) and config["llm"] is None

    model = out / "model"
    assert (model / "trainable.safetensors").is_file() and (model / "mmkit.json").is_file()
    assert (model / "tokenizer" / "tokenizer.json").is_file()
    meta = read_meta(model)
    assert meta["stage"] == "instruct" and list(meta["modalities"]) == [DEMO]
    assert meta["llm"]["name_or_path"] == "demo_data/base_llm"  # portable: relative to the run

    results = json.loads((out / "eval.json").read_text())
    assert list(results) == [DEMO]
    result = results[DEMO]
    n_test = len((out / "demo_data" / f"test_{DEMO}.jsonl").read_text().splitlines())
    assert result["n"] == n_test and result["metric"] == "accuracy"
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["ablated_accuracy"] <= 1
    assert result["ablated_modalities"] == [DEMO] and result["chance"] == pytest.approx(0.25)
    assert summary["eval"] == results


def test_reloaded_model_answers_as_the_evaluation_did(demo_run, demo_host):
    out, _ = demo_run
    results = json.loads((out / "eval.json").read_text())[DEMO]
    model = mmkit.load(out, host=demo_host)
    ctx = ReadContext(modalities={DEMO: demo_host.modality(DEMO)})
    samples = list(iter_samples(demo_host, out / "demo_data" / f"test_{DEMO}.jsonl", ctx))
    # the evaluation's batches: the first 64 held-out samples, 4 new tokens
    preds = predict(model, samples[:64], batch_size=64, max_new_tokens=4)
    assert [(e["id"], e["prediction"]) for e in results["examples"]] == [
        (s.id, p) for s, p in zip(samples[:5], preds[:5])]
    # the same model named by its model/ folder answers the same
    again = mmkit.load(out / "model", host=demo_host)
    assert predict(again, samples[:8], batch_size=8, max_new_tokens=4) == predict(
        model, samples[:8], batch_size=8, max_new_tokens=4)
    # and the whole held-out score is reproduced
    all_preds = preds + predict(model, samples[64:], batch_size=64, max_new_tokens=4)
    refs = [s.turns[-1].text for s in samples]
    assert accuracy(all_preds, refs)["accuracy"] == pytest.approx(results["accuracy"])


def test_align_then_instruct_starts_from_the_align_projectors(tmp_path, demo_host, monkeypatch):
    align_out = tmp_path / "align"
    recipe.train(resolve_config(None, {**SMALL, "max_steps": 10, "stage": "align", "output_dir": str(align_out)}))
    align_meta = read_meta(align_out / "model")
    assert align_meta["stage"] == "align" and align_meta["lora"] is None
    align_state = load_file(str(align_out / "model" / "trainable.safetensors"))
    assert align_state and not any("lora_" in k for k in align_state)

    seen = {}
    real_start_from = recipe.start_from

    def spy(assembled, init_from, **options):
        seen["fresh"] = {n: p.detach().clone() for n, p in assembled.model.named_parameters() if n in align_state}
        notes = real_start_from(assembled, init_from, **options)
        seen["started"] = {n: p.detach().clone() for n, p in assembled.model.named_parameters()
                           if n in align_state}
        return notes

    monkeypatch.setattr(recipe, "start_from", spy)
    instruct_out = tmp_path / "instruct"
    summary = recipe.train(resolve_config(None, {**SMALL, "max_steps": 5, "output_dir": str(instruct_out),
                                                  "init_from": str(align_out)}))
    assert set(seen["started"]) == set(align_state)
    for name, value in align_state.items():
        assert torch.equal(seen["started"][name], value), name
    assert any(not torch.equal(seen["fresh"][n], v) for n, v in align_state.items())  # align did train them
    meta = read_meta(instruct_out / "model")
    assert meta["stage"] == "instruct" and meta["lora"] is not None
    instruct_state = load_file(str(instruct_out / "model" / "trainable.safetensors"))
    assert any("lora_" in k for k in instruct_state)
    assert summary["steps"] == 5 and DEMO in summary["eval"]


def _write_data(root: Path, image: Path, bad: list[dict]) -> Path:
    root.mkdir()
    shutil.copy(image, root / "a.png")
    good = [{"id": f"t{i}", "conversations": [{"from": "human", "value": "What is shown here ?"},
                                               {"from": "gpt", "value": f"digit {i}"}]} for i in range(4)]
    good += [{"id": f"i{i}", "image": "a.png",
              "conversations": [{"from": "human", "value": "<image> What digit is shown ?"},
                                {"from": "gpt", "value": str(i)}]} for i in range(4)]
    records = good[:3] + bad + good[3:]
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_bad_record_stops_the_run_before_training_unless_skipped(tmp_path, mm_host, tiny_llm, input_files):
    bad = [{"id": "oops", "conversations": [{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "Hello"}]},
           {"id": "gone", "image": "missing.png",
            "conversations": [{"from": "human", "value": "<image> What ?"}, {"from": "gpt", "value": "7"}]}]
    data = _write_data(tmp_path / "data", input_files["image"][0], bad)
    options = {"llm": str(tiny_llm("llama")), "data": [str(data)], "modalities": ["image"], "max_steps": 3,
               "micro_batch_size": 4, "tensorboard": False, "lora_r": 4, "log_every": 1}

    out = tmp_path / "strict"
    with pytest.raises(DataError, match=r"train.jsonl record 3 .*turn 0 is from assistant, expected user"):
        recipe.train(resolve_config(None, {**options, "output_dir": str(out)}))
    assert not (out / "metrics.jsonl").exists() and not (out / "model").exists()

    out = tmp_path / "skipping"
    summary = recipe.train(resolve_config(None, {**options, "output_dir": str(out), "skip_bad_records": True}))
    assert summary["skipped_records"] == 2 and summary["steps"] == 3
    logs = read_metrics(out)
    assert logs[-1]["step"] == 3 and logs[-1]["skipped_records"] == 2
    assert [r["step"] for r in logs if "loss" in r] == [1, 2, 3]
    assert (out / "model" / "mmkit.json").is_file() and "eval" not in summary


def test_progress_is_plain_log_lines_when_not_a_terminal(monkeypatch):
    """A log file shows the run moving: one line per logged step (rich's live bar only on a terminal)."""
    import logging

    from mmkit.training import logs

    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Collect()
    logs.log.addHandler(handler)
    level = logs.log.level
    logs.log.setLevel(logging.INFO)  # as logs.setup sets it on process 0
    monkeypatch.setattr(logs, "is_terminal", lambda: False)
    try:
        with logs.TrainProgress(20, 10, enabled=True) as progress:
            progress.advance(11)
            progress.measured(15, 1.23456, 4321.0)
        with logs.TrainProgress(20, 0, enabled=False) as quiet:  # processes other than 0
            quiet.measured(5, 1.0, 1.0)
    finally:
        logs.log.removeHandler(handler)
        logs.log.setLevel(level)
    assert len(seen) == 1 and seen[0].startswith("step 15/20 (75%) loss 1.2346 4,321 tok/s elapsed 0:00:00 ETA ")

"""The data commands as users run them: ``mmkit data validate`` (the real console script), and
``mmkit train`` with packed batches, a feature cache and --skip-bad-records end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

MMKIT = Path(sys.executable).with_name("mmkit")


def run_mmkit(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMKIT_")}
    env["COLUMNS"] = "250"
    return subprocess.run([str(MMKIT), *map(str, args)], capture_output=True, text=True, env=env, timeout=180)


def conv(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Eight image records (one of them a corrupt file) and two text-only records."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    records = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        records.append({"id": f"r{i}", "image": f"img/{i}.png",
                        "conversations": conv("<image> What digit is shown ?", str(i % 3))})
    (tmp_path / "img" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    records += [{"id": f"t{i}", "conversations": conv("hello world", "yes")} for i in range(2)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_validate_command_exit_codes_and_report(data):
    bad = run_mmkit("data", "validate", data)
    assert bad.returncode == 1
    assert f"{data} record 3 (id r3): cannot decode" in bad.stdout
    assert "1 error(s): 10 records, 8 input files checked" in bad.stdout
    report = json.loads(run_mmkit("data", "validate", data, "--json").stdout)
    assert report["summary"]["records_with_errors"] == 1 and report["records"][3]["status"] == "error"

    lines = data.read_text().splitlines()
    good = data.with_name("good.jsonl")
    good.write_text("\n".join(lines[:3] + lines[4:]) + "\n")
    ok = run_mmkit("data", "validate", good, "--no-decode")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK: 9 records" in ok.stdout and "existence only" in ok.stdout

    usage = run_mmkit("data", "validate", "--help")
    assert usage.returncode == 0 and "--tokens-per-input" in usage.stdout
    assert "--config" in usage.stdout and "encoder_options.image.anyres=true" in usage.stdout  # the run's encoders


@pytest.mark.slow
def test_train_packed_with_cache_and_skipped_records(tmp_path, data, tiny_llm, monkeypatch):
    from typer.testing import CliRunner

    from mmkit_cli.main import _register_commands, app

    monkeypatch.setenv("COLUMNS", "200")
    _register_commands()
    runner = CliRunner()
    common = ["train", "--llm", str(tiny_llm()), "--data", str(data), "--modalities", "image", "--max-steps", "3",
              "--micro-batch-size", "2", "--lora-r", "4", "--batching", "packed", "--pack-max-tokens", "64",
              "--cache-features", str(tmp_path / "cache"), "--set", "tensorboard=false", "--set", "log_every=1",
              "--set", "max_length=64"]

    strict = runner.invoke(app, [*common, "--output-dir", str(tmp_path / "strict")])
    assert strict.exit_code != 0
    # the cache fill decodes every input before training: the corrupt file stops the run up front
    assert f"{data} record 3 (id r3): {data.parent}/img/3.png: not a readable image" in str(strict.exception)
    assert "mmkit train stage" not in strict.output
    assert "8 inputs, 0 read from the cache, 7 encoded now" in strict.output

    out = tmp_path / "run"
    result = runner.invoke(app, [*common, "--output-dir", str(out), "--skip-bad-records"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "7 read from the cache, 0 encoded now" in result.output
    assert "1 skipped records" in result.output.replace("\n", " ")
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logs[-1]["skipped_records"] == 1
    assert all(0.0 <= r["padding_fraction"] < 0.5 for r in logs if "loss" in r)
    shards = list((tmp_path / "cache").glob("image-*/shard-*.safetensors"))
    assert shards


def test_train_options_reach_the_config():
    from mmkit.errors import ConfigError
    from mmkit.training.config import resolve_config

    cfg = resolve_config(None, {"batching": "packed", "pack_max_tokens": 256, "cache_features": "/tmp/c"})
    assert (cfg.batching, cfg.pack_max_tokens, cfg.cache_features) == ("packed", 256, "/tmp/c")
    with pytest.raises(ConfigError, match="batching 'sorted'"):
        resolve_config(None, {"batching": "sorted"})
    with pytest.raises(ConfigError, match="pack_max_tokens 64 is below max_length 128"):
        resolve_config(None, {"batching": "packed", "pack_max_tokens": 64})
    with pytest.raises(ConfigError, match="encoder_lora"):
        resolve_config(None, {"cache_features": "/tmp/c", "encoder_lora": True})


def test_train_checks_every_record_before_training(tmp_path, data, tiny_llm, assemble_model):
    """The cheap checks run on all records up front: the first problem is raised with the count of
    the others, or every bad record is skipped and counted."""
    from mmkit.data.sources import DataSource
    from mmkit.errors import DataError
    from mmkit.training.config import resolve_config
    from mmkit.training.recipe import RunPlan, read_training_samples

    lines = data.read_text().splitlines()
    lines[1] = json.dumps({"id": "bad-order", "conversations": [{"from": "gpt", "value": "x"},
                                                                 {"from": "human", "value": "y"}]})
    lines[5] = json.dumps({"id": "gone", "image": "img/none.png", "conversations": conv("<image> What ?", "1")})
    data.write_text("\n".join(lines) + "\n")
    assembled = assemble_model(("image",))
    plan = RunPlan(llm=str(tiny_llm()), modalities=("image",), train_sources=(DataSource(data),), eval_sources={},
                   chance={})
    cfg = resolve_config(None, {"llm": str(tiny_llm()), "data": [str(data)], "modalities": ["image"]})
    with pytest.raises(DataError, match=r"record 1 \(id bad-order\): turn 0 is from assistant.*and 1 more bad record"):
        read_training_samples(cfg, plan, _host(), assembled)
    cfg = resolve_config(None, {"llm": str(tiny_llm()), "data": [str(data)], "modalities": ["image"],
                                "skip_bad_records": True})
    good, skipped = read_training_samples(cfg, plan, _host(), assembled)
    assert len(good) == 8 and [s.where for s in skipped] == [f"{data} record 1 (id bad-order)",
                                                             f"{data} record 5 (id gone)"]


def _host():
    from mmkit.plugins import get_host

    return get_host()

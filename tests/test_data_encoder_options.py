"""``mmkit data inspect`` / ``mmkit data validate`` with the run's encoder settings (``--config``,
``--set encoder_options.image.anyres=true``): each input is counted with the encoder and projector
the run would use, exactly as the training data path reserves it, and ``validate --llm``
preprocesses each variable-size input once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from mmkit_cli.data_cmd import data_app

#: (height, width) -> slots of the tiny image encoder with anyres on (16 px crops of 4 px patches:
#: base 16 + map rows x (cols + newline); plugins/image/tests/test_anyres.py's THREE_RATIOS)
IMAGES = {"square": ((32, 32), 16 + 8 * 9), "wide": ((32, 64), 16 + 4 * 9), "tall": ((48, 16), 16 + 12 * 5)}
ANYRES = ("--set", "encoder_options.image.anyres=true")


@pytest.fixture
def cli(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    app = typer.Typer()
    app.add_typer(data_app, name="data")
    return lambda *args: CliRunner().invoke(app, ["data", *map(str, args)])


@pytest.fixture
def data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    records = []
    for name, ((h, w), _) in IMAGES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
        records.append({"id": name, "image": f"{name}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat shape is the picture?"}, {"from": "gpt", "value": name}]})
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _entries(result) -> dict[str, dict]:
    assert result.exit_code == 0, result.output + repr(result.exception)
    return {e["id"]: e for e in map(json.loads, result.output.splitlines())}


def _training_items(data: Path, llm: Path, options: dict) -> dict[str, dict]:
    """What the training data path feeds the model: SampleDataset with the run's encoder's
    preprocess and the counters training builds (mmkit.data.batching.input_counters)."""
    from mmkit.data.batching import SampleDataset, input_counters, make_preprocessor
    from mmkit.data.inspect import iter_records
    from mmkit.data.validate import prompt_builder_for
    from mmkit.modeling.components import build_encoder, build_projector
    from mmkit.plugins import get_host
    from mmkit.specs import resolve

    host = get_host()
    spec = host.modality("image")
    encoder = build_encoder(host, spec, options=options)
    projector = build_projector(host, spec.projector, in_dim=encoder.output_dim, out_dim=16,
                                num_tokens=encoder.num_tokens, separator=encoder.uses_separators)
    counters = input_counters({"image": encoder}, {"image": projector})
    prompts = prompt_builder_for(str(llm), {"image": spec.markers},
                                 {"image": None if counters else projector.num_output_tokens})
    samples = list(iter_records(host, [data], ["image"]))
    dataset = SampleDataset(samples, prompts, {"image": make_preprocessor(resolve(spec.load), encoder.preprocess)},
                            counters=counters)
    placeholder = prompts.tokenizer.convert_tokens_to_ids(spec.markers.placeholder)
    return {s.id: {"input_ids": list(item["input_ids"]), "slots": list(item["input_ids"]).count(placeholder)}
            for s, item in zip(samples, (dataset[i] for i in range(len(samples))), strict=True)}


def test_inspect_counts_each_image_with_the_runs_anyres_encoder(cli, data, tiny_llm, tmp_path):
    llm = tiny_llm()
    plain = _entries(cli("inspect", data, "--llm", llm, "--modalities", "image", "--json", "--limit", 10))
    assert {k: e["slots"] for k, e in plain.items()} == {k: {"image": [16]} for k in IMAGES}  # the fixed path

    anyres = _entries(cli("inspect", data, "--llm", llm, "--modalities", "image", "--json", "--limit", 10, *ANYRES))
    assert {k: e["slots"] for k, e in anyres.items()} == {k: {"image": [n]} for k, (_, n) in IMAGES.items()}
    # the very sequence training builds for each record, slots included
    training = _training_items(data, llm, {"anyres": True})
    assert {k: t["slots"] for k, t in training.items()} == {k: n for k, (_, n) in IMAGES.items()}
    assert {k: e["input_ids"] for k, e in anyres.items()} == {k: t["input_ids"] for k, t in training.items()}
    assert anyres["tall"]["tokens"] - anyres["wide"]["tokens"] == 76 - 52

    # the train YAML gives the same (and its llm stands in for --llm)
    config = tmp_path / "run.yaml"
    config.write_text(f"llm: {llm}\nmodalities: [image]\nencoder_options:\n  image:\n    anyres: true\n")
    from_file = _entries(cli("inspect", data, "--config", config, "--json", "--limit", 10))
    assert {k: e["slots"] for k, e in from_file.items()} == {k: e["slots"] for k, e in anyres.items()}

    # a resampler fixes the count whatever the image
    resampled = _entries(cli("inspect", data, "--llm", llm, "--modalities", "image", "--json", "--limit", 10,
                             *ANYRES, "--set", "projectors.image=resampler",
                             "--set", "projector_options.image.num_queries=5"))
    assert {k: e["slots"] for k, e in resampled.items()} == {k: {"image": [5]} for k in IMAGES}

    bad = cli("inspect", data, "--llm", llm, "--set", "encoder_optionz.image.anyres=true")
    assert bad.exit_code != 0 and "unknown option 'encoder_optionz'" in str(bad.exception)


def test_validate_measures_lengths_with_the_runs_encoder_preprocessing_each_input_once(cli, data, tiny_llm,
                                                                                         monkeypatch):
    from mmkit.data import preprocess_check
    from mmkit_plugin_image.encoder import CLIPImageEncoder

    for cache in ("_CHECKS", "_ENCODERS", "_PROJECTORS"):  # fresh encoders, built with the counting preprocess
        monkeypatch.setattr(preprocess_check, cache, {})
    seen: list[tuple] = []
    original = CLIPImageEncoder.preprocess

    def counting(self, raw):
        seen.append(tuple(np.asarray(raw).shape) if not isinstance(raw, Image.Image) else raw.size)
        return original(self, raw)

    monkeypatch.setattr(CLIPImageEncoder, "preprocess", counting)
    wide = len(_entries(cli("inspect", data, "--llm", tiny_llm(), "--modalities", "image", "--json",
                            *ANYRES))["wide"]["input_ids"])
    seen.clear()
    # the wide image fits exactly; the square (36 more slots) and the tall one (24 more) do not
    result = cli("validate", data, "--llm", tiny_llm(), "--modalities", "image", "--max-length", wide, "--json",
                 *ANYRES)
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    status = {r["id"]: r["status"] for r in report["records"] if r["record"] is not None}  # not whole-file notes
    assert status == {"square": "error", "wide": "ok", "tall": "error"}
    reasons = [i["reason"] for r in report["records"] for i in r["issues"] if i["kind"] == "too_long"]
    assert any("(1 image x 88)" in r for r in reasons) and any("(1 image x 76)" in r for r in reasons)
    assert "inputs preprocessed with the run's encoders: image: clip {'anyres': True}" in report["summary"]["notes"]
    assert len(seen) == 3, seen  # each image preprocessed once: the file check counted it for the length check

    plain = json.loads(cli("validate", data, "--llm", tiny_llm(), "--modalities", "image", "--max-length", wide,
                           "--json").output)
    assert plain["ok"]  # the tiny default encoder: 16 slots an image, every record fits

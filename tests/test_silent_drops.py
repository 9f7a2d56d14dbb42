"""No silent drops: an input training would ignore is refused (or, with --skip-bad-records, left out
and counted); symbolic links are resolved before the data-root check; a UTF-8 byte-order mark is
accepted; a number as a turn and deeply nested JSON are named for what they are."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mmkit.data.readers import iter_raw_records
from mmkit.records import ReadContext
from mmkit.data.sources import iter_samples
from mmkit.errors import DataError


def _records(image: Path, cloud: Path) -> list[dict]:
    good = [{"id": f"ok-{i}", "image": str(image),
             "conversations": [{"from": "human", "value": "<image> What is shown here ?"},
                               {"from": "gpt", "value": "a cube"}]} for i in range(4)]
    return good + [
        {"id": "with-cloud", "image": str(image), "pointcloud": str(cloud),
         "conversations": [{"from": "human", "value": "<image> What is shown here ?"}, {"from": "gpt", "value": "no"}]},
        # "sonar": a key of no installed modality ("video" was one until the image plugin registered it)
        {"id": "with-sonar", "sonar": "ping.bin",
         "conversations": [{"from": "human", "value": "What is shown here ?"}, {"from": "gpt", "value": "yes"}]},
    ]


def _write(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.slow
def test_training_refuses_inputs_it_would_ignore_or_skips_and_names_them(tmp_path, mm_host, tiny_llm, input_files):
    """Before: both records trained without their point cloud / sonar input, without a word."""
    from mmkit.training import recipe
    from mmkit.training.config import resolve_config

    import shutil

    shutil.copy(input_files["image"][0], tmp_path / "img.png")
    shutil.copy(input_files["pointcloud"][0], tmp_path / "pcl.npy")
    data = _write(tmp_path / "train.jsonl", _records(Path("img.png"), Path("pcl.npy")))
    options = {"llm": str(tiny_llm("llama")), "data": [str(data)], "modalities": ["image"], "max_steps": 1,
               "micro_batch_size": 2, "tensorboard": False, "lora_r": 4, "log_every": 1}
    out = tmp_path / "strict"
    with pytest.raises(DataError) as refused:
        recipe.train(resolve_config(None, {**options, "output_dir": str(out)}))
    text = str(refused.value)
    assert "record 4 (id with-cloud): key 'pointcloud' holds pointcloud input, but pointcloud is not among the " \
           "selected modalities (image): add it to --modalities or remove the key" in text
    assert "(and 1 more bad record(s)" in text
    assert not (out / "config.yaml").exists() and not (out / "model").exists()

    out = tmp_path / "skipping"
    summary = recipe.train(resolve_config(None, {**options, "output_dir": str(out), "skip_bad_records": True}))
    assert summary["skipped_records"] == 2
    named = (out / "skipped.jsonl").read_text()
    assert "with-cloud" in named and "with-sonar" in named and "unknown key 'sonar'" in named


def test_validate_names_an_installed_but_unselected_modality(tmp_path, mm_host, input_files):
    """Before: "not a data key of an installed modality", for the installed pointcloud."""
    from mmkit.data.validate import validate

    import shutil

    shutil.copy(input_files["image"][0], tmp_path / "img.png")
    shutil.copy(input_files["pointcloud"][0], tmp_path / "pcl.npy")
    data = _write(tmp_path / "train.jsonl", _records(Path("img.png"), Path("pcl.npy")))
    report = validate([data], host=mm_host, modalities=["image"], decode_files=False)
    texts = [issue.reason if hasattr(issue, "reason") else str(issue) for issue in report.errors]
    joined = " | ".join(map(str, texts))
    assert "key 'pointcloud' holds pointcloud input, but pointcloud is not among the selected modalities" in joined
    assert "unknown key 'sonar': not a field of the format nor a data key of any installed modality" in joined


def _ctx(host, root: Path | None = None, **kw) -> ReadContext:
    return ReadContext(modalities={"image": host.modality("image")}, data_root=root, **kw)


def test_a_symlink_inside_the_data_root_pointing_outside_is_refused(tmp_path, mm_host, input_files):
    """Before: accepted by validate and train."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    secret = outside / "secret.png"
    secret.write_bytes(input_files["image"][0].read_bytes())
    os.symlink(secret, root / "inside.png")
    os.symlink(outside, root / "linked_dir")
    (root / "real.png").write_bytes(secret.read_bytes())
    for raw in ("inside.png", "linked_dir/secret.png"):
        data = _write(tmp_path / "d.jsonl", [{"id": "x", "image": raw, "conversations": [
            {"from": "human", "value": "<image> What is shown here ?"}, {"from": "gpt", "value": "a cube"}]}])
        with pytest.raises(DataError, match=rf"path '{raw}' escapes the data root .*root through a symbolic link, "
                                            r"to .*outside.*--allow-outside-root"):
            list(iter_samples(mm_host, data, _ctx(mm_host, root)))
        assert list(iter_samples(mm_host, data, _ctx(mm_host, root, allow_outside_root=True)))
    data = _write(tmp_path / "d.jsonl", [{"id": "x", "image": "real.png", "conversations": [
        {"from": "human", "value": "<image> What is shown here ?"}, {"from": "gpt", "value": "a cube"}]}])
    assert list(iter_samples(mm_host, data, _ctx(mm_host, root)))  # a plain file inside: fine
    linked_root = tmp_path / "root_link"
    os.symlink(root, linked_root)  # a root reached through a link still holds its own files
    assert list(iter_samples(mm_host, data, _ctx(mm_host, linked_root)))


@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, mm_host, layout):
    """Before: refused as "not JSON or JSONL"."""
    records = [{"id": str(i), "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]}
               for i in range(3)]
    text = json.dumps(records) if layout == "json" else "".join(json.dumps(r) + "\n" for r in records)
    path = tmp_path / f"bom.{layout}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    samples = list(iter_samples(mm_host, path, _ctx(mm_host)))
    assert [s.id for s in samples] == ["0", "1", "2"]


def test_a_number_as_a_turn_is_named_as_such(tmp_path, mm_host):
    """Before: "turn 1 is empty"."""
    path = _write(tmp_path / "n.jsonl", [{"id": "n", "conversations": [{"from": "human", "value": "hello"},
                                                                       {"from": "gpt", "value": 42}]}])
    with pytest.raises(DataError, match=r"record 0 \(id n\): turn 1: the value must be text, got int 42"):
        list(iter_samples(mm_host, path, _ctx(mm_host)))


@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_deeply_nested_json_is_a_clear_error(tmp_path, mm_host, layout):
    """Before: RecursionError."""
    path = tmp_path / f"deep.{layout}"
    if layout == "json":
        path.write_text("[" + "[" * 100_000 + "]" * 100_000 + "]")
    else:
        path.write_text('{"a": ' * 100_000 + "1" + "}" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"nested too deeply"):
        list(iter_samples(mm_host, path, _ctx(mm_host)))
    if layout == "jsonl":
        bad = []
        assert list(iter_raw_records(path, on_bad_line=bad.append)) == [] and "nested too deeply" in str(bad[0])

"""``mmkit data validate``: every kind of bad input is an error naming the record (exit 1), warnings
do not fail, the length check counts modality tokens exactly as training does, and files are
decoded in parallel, each once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from mmkit.data.validate import PromptLengths, check_files, validate
from mmkit_cli.data_cmd import data_app

runner = CliRunner()


def conv(*texts: str) -> list[dict]:
    return [{"from": ("human", "gpt")[i % 2], "value": t} for i, t in enumerate(texts)]


@pytest.fixture
def cli(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    app = typer.Typer()
    app.add_typer(data_app, name="data")
    return lambda *args: runner.invoke(app, ["data", "validate", *map(str, args)])


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A data root with a good image, a good point cloud, a corrupt image and a non-image file."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "img" / "good.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    np.save(tmp_path / "cloud.npy", rng.normal(size=(64, 3)).astype(np.float32))
    return tmp_path


GOOD = {"id": "ok", "image": "img/good.png", "conversations": conv("<image>\nWhat is shown here ?", "a cube")}


def write(root: Path, records: list, name: str = "data.jsonl") -> Path:
    path = root / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# -- item 5 of the issue: each bad input, named, exit 1 ------------------------------------------------
BAD_RECORDS = {
    "not an object": (["just a string"], r"record 1: record must be a JSON object, got str"),
    "no conversations": ({"id": "b", "image": "img/good.png"}, r"record 1 \(id b\): no 'conversations'"),
    "empty turn": ({"id": "b", "conversations": conv("Hi", "   ")}, r"record 1 \(id b\): turn 1 is empty"),
    "wrong turn order": ({"id": "b", "conversations": [{"from": "gpt", "value": "Hi"},
                                                       {"from": "human", "value": "x"}]},
                         r"record 1 \(id b\): turn 0 is from assistant, expected user"),
    "placeholder without input": ({"id": "b", "conversations": conv("<image> What?", "a")},
                                  r"record 1 \(id b\): 1 <image> placeholder\(s\) but no image input"),
    "input without placeholder": ({"id": "b", "image": "img/good.png", "conversations": conv("What?", "a")},
                                  r"record 1 \(id b\): 1 image input\(s\) but no <image> placeholder"),
    "path escaping the root": ({"id": "b", "image": "../outside.png", "conversations": conv("<image> What?", "a")},
                               r"record 1 \(id b\): path '\.\./outside\.png' escapes the data root"),
    "missing file": ({"id": "b", "image": "img/nope.png", "conversations": conv("<image> What?", "a")},
                     r"record 1 \(id b\): file not found: .*img/nope\.png"),
    "corrupt file": ({"id": "b", "image": "img/broken.png", "conversations": conv("<image> What?", "a")},
                     r"record 1 \(id b\): cannot decode .*broken\.png: "),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_each_bad_record_fails_validation_by_name(cli, root, case):
    record, message = BAD_RECORDS[case]
    record = record[0] if isinstance(record, list) else record
    path = write(root, [GOOD, record, GOOD])
    result = cli(path)
    assert result.exit_code == 1, result.output
    assert "1 error(s)" in result.output
    import re

    assert re.search(rf"{re.escape(str(path))} {message}", result.output), result.output


def test_outside_root_allowed_on_request(cli, root, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    Image.new("RGB", (4, 4)).save(elsewhere / "x.png")
    record = {"id": "b", "image": str(elsewhere / "x.png"), "conversations": conv("<image> What?", "a")}
    path = write(root, [GOOD, record])
    assert cli(path).exit_code == 1
    result = cli(path, "--allow-outside-root")
    assert result.exit_code == 0, result.output


def test_over_length_sample_needs_the_tokenizer(cli, root, tiny_llm):
    path = write(root, [GOOD, {"id": "long", "conversations": conv("hello world " * 20, "yes")}])
    result = cli(path)
    assert result.exit_code == 0 and "token-length check skipped" in result.output
    result = cli(path, "--llm", tiny_llm(), "--max-length", 30, "--tokens-per-input", "image=16",
                 "--modalities", "image")
    assert result.exit_code == 1, result.output
    assert f"{path} record 1 (id long): 45 tokens including modality tokens, over the maximum 30" in result.output
    # modality tokens count: 16 image tokens + 2 markers push the good record over a lower maximum
    result = cli(path, "--llm", tiny_llm(), "--max-length", 20, "--tokens-per-input", "image=16",
                 "--modalities", "image")
    assert "record 0 (id ok): " in result.output and "(1 image x 16)" in result.output


@pytest.mark.parametrize("content, message", [
    (b"id,conversations\n1,2\n", "not JSON or JSONL"),
    (b'[{"id": 1,', "not valid JSON"),
    (b"\xff\xfe[\x00{\x00", "not UTF-8 text"),
    (b"", "no records"),
])
def test_bad_files_fail_by_name(cli, root, content, message):
    path = root / "bad.json"
    path.write_bytes(content)
    result = cli(path, write(root, [GOOD], "good.jsonl"))
    assert result.exit_code == 1
    assert f"{path}: {message}" in result.output.replace("\n", " ") or message in result.output, result.output
    assert "good.jsonl" in result.output  # the other file is still checked


def test_bad_jsonl_lines_are_reported_and_the_rest_checked(root):
    path = root / "d.jsonl"
    good = [json.dumps(dict(GOOD, id=str(i))).encode() for i in range(60)]  # past the 4 KiB head check
    lines = good[:2] + [b"{broken"] + good[2:50] + [b'{"id": "\xe9"}'] + good[50:]
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = validate([path])
    assert [(i.record, i.kind) for i in report.errors] == [(2, "file_format"), (51, "encoding")]
    assert "line 3 is not valid JSON" in report.errors[0].reason
    assert report.files[0].records == 62 and report.files[0].ok == 60


def test_unknown_keys_are_errors_and_duplicate_ids_warnings(cli, root):
    """`mmkit train` refuses a record with a key it would ignore, so validate fails it too (it was a
    warning: validate said OK and the training run then stopped on the same file)."""
    path = write(root, [dict(GOOD, colour="red"), GOOD])
    result = cli(path)
    assert result.exit_code == 1, result.output
    assert "error" in result.output and "unknown key 'colour'" in result.output
    assert "1 error(s): 2 records" in result.output and "id 'ok' also used by" in result.output
    duplicates = cli(write(root, [GOOD, GOOD], "dup.jsonl"))
    assert duplicates.exit_code == 0 and "id 'ok' also used by" in duplicates.output


def test_json_report_lists_every_record(cli, root):
    path = write(root, [GOOD, {"id": "b", "conversations": conv("Hi", " ")}, dict(GOOD, id="c", extra=1)])
    result = cli(path, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["summary"]["records"] == 3
    assert [(r["record"], r["id"], r["status"]) for r in report["records"]] == [
        (0, "ok", "ok"), (1, "b", "error"), (2, "c", "error")]
    assert report["records"][1]["issues"] == [{"severity": "error", "kind": "empty_turn", "reason": "turn 1 is empty"}]


def test_lamm_and_llava_files_and_data_root(cli, root):
    lamm = [{"id": "p", "pcl": "cloud.npy", "task_type": "classification3d",
             "conversations": conv("<pcl>\nWhich shape is it ?", "a cube")}]
    (root / "meta").mkdir()
    lamm_path = root / "meta" / "lamm.json"
    lamm_path.write_text(json.dumps(lamm))
    llava_path = root / "meta" / "llava.json"
    llava_path.write_text(json.dumps([GOOD]))
    # paths are relative to the data root, not to the file's folder
    assert cli(lamm_path, llava_path).exit_code == 1
    result = cli(lamm_path, llava_path, "--data-root", root)
    assert result.exit_code == 0, result.output
    report = validate([lamm_path, llava_path], data_root=root)
    assert [f.reader for f in report.files] == ["lamm", "llava"]


def test_each_file_is_decoded_once_and_in_parallel(root):
    rng = np.random.default_rng(1)
    records = []
    for i in range(300):
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        records.append({"id": str(i), "image": f"img/{i}.png", "conversations": conv("<image> What?", "a")})
    records += [dict(GOOD, id=f"same-{i}") for i in range(50)]  # fifty records, one file
    records.append({"id": "bad", "image": "img/broken.png", "conversations": conv("<image> What?", "a")})
    records.append({"id": "bad2", "image": "img/broken.png", "conversations": conv("<image> What?", "b")})
    report = validate([write(root, records)], workers=2)
    assert report.inputs_checked == 302
    assert sorted(i.id for i in report.errors) == ["bad", "bad2"]
    assert {i.kind for i in report.errors} == {"corrupt_file"}


def test_check_files_without_decoding_only_checks_existence(root):
    failed = check_files({str(root / "img" / "broken.png"): "mmkit_plugin_image.io:load_image",
                          str(root / "img" / "nope.png"): "mmkit_plugin_image.io:load_image"}, decode=False)
    assert list(failed) == [str(root / "img" / "nope.png")]


def test_a_bad_frame_of_a_frame_folder_is_named(root):
    folder = root / "clip"
    folder.mkdir()
    for t in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * t, dtype=np.uint8)).save(folder / f"frame_{t:04d}.png")
    (folder / "frame_0003.png").write_bytes(b"junk")
    failed = check_files({str(folder): "mmkit_plugin_image.video_io:load_video"})
    kind, reason = failed[str(folder)]
    assert kind == "corrupt_file" and reason.startswith(f"cannot decode {folder / 'frame_0003.png'}: "), reason


def test_prompt_lengths_match_training_encoding(assemble_model, kit):
    assembled = assemble_model(("image", "pointcloud"))
    samples = kit.mixed() + [kit.sample("<image> <image> What is shown here ?", "1 2 3", image=["a", "b"])]
    measured = PromptLengths(assembled.prompts)(samples)
    assert [n for n, _ in measured] == [len(assembled.prompts.encode_sample(s).input_ids) for s in samples]
    assert measured[-1][1] == {"image": 2}


def test_validation_imports_no_torch(root):
    import subprocess
    import sys

    path = write(root, [GOOD])
    code = ("import sys; from mmkit.data.validate import validate; r = validate([sys.argv[1]]); "
            "assert r.ok, r.issues; assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_variable_inputs_counted_by_the_parallel_file_check_feed_the_length_check(root, tiny_llm, monkeypatch):
    """With the run's anyres encoder, the pool workers' file check counts each image and the length
    check uses those counts (the main process never preprocesses one), also when records wait for
    their counts in several rounds."""
    from mmkit.data import preprocess_check, validate as module
    from mmkit.data.preprocess_check import encoder_choices
    from mmkit.data.validate import prompt_lengths_for
    from mmkit.plugins import get_host

    monkeypatch.setattr(module, "_CHUNK", 3)
    monkeypatch.setattr(module, "_POOL_THRESHOLD", 1)
    monkeypatch.setattr(module, "_PARKED", 4)
    rng = np.random.default_rng(2)
    records = []
    for i in range(10):
        h, w = (32, 64) if i % 2 else (48, 16)  # 52 and 76 slots
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "img" / f"v{i}.png")
        records.append({"id": f"v{i}", "image": f"img/v{i}.png", "conversations": conv("<image> What?", "a")})
    records.append({"id": "bad", "image": "img/broken.png", "conversations": conv("<image> What?", "a")})
    choices = encoder_choices(["image"], encoder_options={"image": {"anyres": True}})
    lengths = prompt_lengths_for(str(tiny_llm()), {"image": get_host().modality("image").markers}, {"image": None},
                                 max_length=70, choices=choices)

    def not_here(*args, **kwargs):
        raise AssertionError("the main process preprocessed an input to count it")

    monkeypatch.setattr(preprocess_check, "count_tokens", not_here)
    report = validate([write(root, records)], modalities=["image"], lengths=lengths, workers=2, preprocess=True,
                      choices=choices)
    too_long = sorted(i.id for i in report.errors if i.kind == "too_long")
    assert too_long == [f"v{i}" for i in range(0, 10, 2)]  # the tall ones (76 slots)
    assert all("(1 image x 76)" in i.reason for i in report.errors if i.kind == "too_long")
    assert [(i.id, i.kind) for i in report.errors if i.kind != "too_long"] == [("bad", "corrupt_file")]
    assert {v for v in lengths.counter._seen.values() if isinstance(v, int)} == {52, 76}


def test_a_missing_data_file_is_named_as_train_names_it(cli, root):
    missing = root / "no-such-file.json"
    result = cli(missing, write(root, [GOOD], "good2.jsonl"))
    assert result.exit_code == 1
    assert f"{missing}: file not found" in result.output.replace("\n", " "), result.output
    assert "FileNotFoundError" not in result.output and "Errno" not in result.output


def test_a_bad_encoder_option_is_a_config_error_not_every_file_corrupt(cli, root):
    """An encoder option the run's encoder refuses is a problem of the configuration: one error
    naming the option before any record is read, not each input file reported as undecodable."""
    from mmkit.errors import MmkitError

    path = write(root, [GOOD, {**GOOD, "id": "ok2"}])
    result = cli(path, "--set", "encoder_options.image.feature_layer=99")
    assert result.exit_code != 0
    assert isinstance(result.exception, MmkitError), result.output
    assert "feature_layer=99" in str(result.exception) and "cannot decode" not in result.output
    unknown = cli(path, "--set", "encoder_options.image.nope=1")
    assert isinstance(unknown.exception, MmkitError) and "nope" in str(unknown.exception), unknown.output


def test_a_malformed_tokens_per_input_is_refused_without_llm_too(cli, root):
    """--tokens-per-input is checked whether or not --llm turns the length check on (it was ignored
    unparsed without --llm, and the run reported OK)."""
    from mmkit.errors import ConfigError

    result = cli(write(root, [GOOD]), "--tokens-per-input", "image=abc", "--no-decode")
    assert isinstance(result.exception, ConfigError) and "image=abc" in str(result.exception), result.output


@pytest.mark.parametrize("option", [("--show", "-1"), ("--max-length", "0")])
def test_out_of_range_counts_are_usage_errors(cli, root, option):
    """--show -1 listed all but the last issue and said '... and 2 more' of one; --max-length 0
    failed every record as too long."""
    result = cli(write(root, [GOOD]), *option)
    assert result.exit_code == 2 and "Invalid value" in result.output, result.output


def test_a_data_root_that_is_not_a_folder_is_one_config_error(cli, root):
    """As train's preflight says it: one error naming the root, not every input 'file not found'."""
    from mmkit.errors import ConfigError

    result = cli(write(root, [GOOD, GOOD]), "--data-root", root / "nowhere")
    assert isinstance(result.exception, ConfigError), result.output
    assert f"data_root {root / 'nowhere'}: no such directory" in str(result.exception)

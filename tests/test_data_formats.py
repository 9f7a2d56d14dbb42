"""Published data layouts, read as they are: LAMM 2D and 3D instruction files (no placeholder in the
text), LLaVA-1.5's mix665k (ShareGPT text-only records with ``model``), TRL / Hugging Face chat
``messages`` with content parts, ms-swift's ``images``, ShareGPT ``system`` turns, and Hugging Face
``datasets`` files (parquet, arrow, saved dataset directories) found by path. Each validates with no
warning per record and passes the encode check training runs; a tiny run trains on LAMM's layouts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmkit.records import ReadContext
from mmkit.data.sources import iter_samples, pick_reader
from mmkit.data.validate import validate
from mmkit.errors import DataError


def save_png(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)


def save_pcl(path: Path, points: int = 40_000, seed: int = 0) -> None:
    """LAMM's point clouds: N x 6 (xyz + rgb), 40,000 points."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(points, 3)).astype(np.float32)
    np.save(path, np.concatenate([xyz, rng.random((points, 3), dtype=np.float32)], axis=1))


@pytest.fixture
def lamm(tmp_path: Path) -> dict[str, Path]:
    """LAMM's 2D and 3D instruction files laid out as its DATASET.md publishes them."""
    root = tmp_path / "LAMM"
    for i in range(3):
        save_png(root / "2D_Instruct" / "coco_images" / f"00000000{i}.jpg.png", seed=i)
        save_pcl(root / "3D_Instruct" / "shapenet_pcls" / f"04379243_{i}_4096.npy", seed=i)
    two_d = [{"id": f"coco_{i}", "image": f"coco_images/00000000{i}.jpg.png", "src_image": f"coco/{i}.jpg",
              "task_type": task, "conversations": [
                  {"from": "human", "value": "Identify all the objects in the image and give their bounding boxes."},
                  {"from": "gpt", "value": "There is a cat at [0.12, 0.30, 0.55, 0.91]."},
                  {"from": "human", "value": "What is the cat doing?"},
                  {"from": "gpt", "value": "It is sleeping."}]}
             for i, task in enumerate(["detection", "conversation", "VQA"])]
    three_d = [{"pcl": f"shapenet_pcls/04379243_{i}_4096.npy", "task_type": "classification3d",
                "src_dataset": "ShapeNet", "src_id": f"04379243_{i}",
                "conversations": [{"from": "human", "value": "What is this object?"},
                                  {"from": "gpt", "value": "The object is a table."}]}
               for i in range(3)]
    (root / "2D_Instruct" / "meta_file").mkdir(parents=True)
    (root / "3D_Instruct" / "meta_file").mkdir(parents=True)
    out = {"2d": root / "2D_Instruct" / "meta_file" / "LAMM_instruct_186k.json",
           "3d": root / "3D_Instruct" / "meta_file" / "LAMM_3dinstruct_10k.json"}
    out["2d"].write_text(json.dumps(two_d, indent=2))
    out["3d"].write_text(json.dumps(three_d, indent=2))
    return out


def ctx(host, root: Path | None = None, **kw) -> ReadContext:
    return ReadContext(modalities={m: host.modality(m) for m in host.modalities()}, data_root=root, **kw)


def test_lamm_files_read_as_published_with_the_inputs_before_the_first_human_turn(mm_host, lamm):
    root2d = lamm["2d"].parents[1]
    assert pick_reader(mm_host, lamm["2d"], None) == "lamm"
    samples = list(iter_samples(mm_host, lamm["2d"], ctx(mm_host, root2d)))
    assert [s.id for s in samples] == ["coco_0", "coco_1", "coco_2"]
    first = samples[0]
    placeholder = mm_host.modality("image").markers.placeholder
    assert first.turns[0].text == placeholder + "\nIdentify all the objects in the image and give their bounding boxes."
    assert placeholder not in first.turns[2].text  # only before the first human turn
    assert first.inputs == {"image": (str(root2d / "coco_images/000000000.jpg.png"),)}
    assert first.system and "box" in first.system  # task_type selects LAMM's system message

    root3d = lamm["3d"].parents[1]
    assert pick_reader(mm_host, lamm["3d"], None) == "lamm"
    [s3, *_] = list(iter_samples(mm_host, lamm["3d"], ctx(mm_host, root3d)))
    pcl = mm_host.modality("pointcloud").markers.placeholder
    assert s3.turns[0].text == pcl + "\nWhat is this object?" and s3.modalities == ("pointcloud",)


def test_lamm_and_llava_layouts_validate_with_no_warning_and_encode(mm_host, lamm, tmp_path):
    from mmkit.data.validate import prompt_lengths_for

    llava_root = tmp_path / "llava"
    save_png(llava_root / "coco" / "train2017" / "000000033471.jpg.png")
    mix = [
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg.png",
         "conversations": [{"from": "human", "value": "What are the colors of the bus in the image?\n<image>"},
                           {"from": "gpt", "value": "The bus in the image is white and red."},
                           {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                           {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "i6IyJda_0", "model": "",
         "conversations": [{"from": "human", "value": "How to tell if a customer segment is well segmented?"},
                           {"from": "gpt", "value": "Check that each segment is distinct and actionable."}]},
    ]
    (llava_root / "llava_v1_5_mix665k.json").write_text(json.dumps(mix))
    markers = {m: mm_host.modality(m).markers for m in ("image", "pointcloud")}
    # the encode check with a real tokenizer: Llama-2's (as Vicuna / LLaVA-1.5 use) with LLaVA-1.5's template
    llama2 = Path(os.environ.get("MMKIT_TOKENIZER_CACHE", Path.home() / ".cache" / "mmkit" / "tokenizers")) / "llama2"
    if not (llama2 / "tokenizer.json").is_file():
        pytest.skip("run python scripts/fetch_tokenizers.py") if not os.environ.get("CI") else pytest.fail("no tokenizer")
    lengths = prompt_lengths_for(str(llama2), markers, {"image": 576, "pointcloud": 256}, max_length=2048,
                                 template="vicuna_v1")
    for files, root in (([lamm["2d"]], lamm["2d"].parents[1]), ([lamm["3d"]], lamm["3d"].parents[1]),
                        ([llava_root / "llava_v1_5_mix665k.json"], None)):
        report = validate(files, host=mm_host, data_root=root, lengths=lengths)
        assert report.ok and not report.issues, [i.message() for i in report.issues]
        assert report.num_records == (2 if root is None else 3)


def test_chat_messages_with_content_parts_ms_swift_and_system_turns(mm_host, tmp_path):
    save_png(tmp_path / "a.png")
    save_png(tmp_path / "b.png", seed=1)
    records = [
        # TRL / Hugging Face chat: content parts, inputs in a plural modality key
        {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare with"},
                                                   {"type": "image"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "They differ."}]}],
         "images": ["a.png", "b.png"]},
        # a part holding its own path
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                   {"type": "text", "text": "What is it?"}]},
                      {"role": "assistant", "content": "Noise."}]},
        # ms-swift: placeholders in the text, "images"
        {"messages": [{"role": "system", "content": "You are helpful."},
                      {"role": "user", "content": "<image>Describe it."},
                      {"role": "assistant", "content": "Random pixels."}], "images": ["b.png"]},
        # ShareGPT with a system turn, text only
        {"conversations": [{"from": "system", "value": "Answer in French."},
                           {"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Bonjour"}]},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    samples = list(iter_samples(mm_host, path, ctx(mm_host)))
    ph = mm_host.modality("image").markers.placeholder
    assert samples[0].system == "Be brief." and samples[0].turns[0].text == f"{ph}Compare with{ph}"
    assert samples[0].inputs == {"image": (str(tmp_path / "a.png"), str(tmp_path / "b.png"))}
    assert samples[1].inputs == {"image": (str(tmp_path / "a.png"),)} and samples[1].turns[0].text == ph + "What is it?"
    assert samples[2].system == "You are helpful." and samples[2].inputs == {"image": (str(tmp_path / "b.png"),)}
    assert samples[3].system == "Answer in French." and samples[3].inputs == {}
    report = validate([path], host=mm_host)
    assert report.ok and not report.issues, [i.message() for i in report.issues]


def test_bad_content_parts_are_named(mm_host, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "x", "messages": [
        {"role": "user", "content": [{"type": "hologram"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "no"}]}) + "\n")
    with pytest.raises(DataError, match=r"record 0 \(id x\): turn 0 part 0: part type 'hologram'"):
        list(iter_samples(mm_host, path, ctx(mm_host)))


def test_hf_datasets_files_are_found_by_path_and_streamed(mm_host, tmp_path):
    datasets = pytest.importorskip("datasets")
    save_png(tmp_path / "imgs" / "0.png")
    rows = {"id": ["a", "b"], "images": [["imgs/0.png"], []],
            "messages": [[{"role": "user", "content": "<image>What is shown?"}, {"role": "assistant", "content": "Noise."}],
                         [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]]}
    ds = datasets.Dataset.from_dict(rows)
    parquet = tmp_path / "train.parquet"
    ds.to_parquet(str(parquet))
    saved = tmp_path / "saved"
    ds.save_to_disk(str(saved))
    arrow = next(saved.glob("*.arrow"))
    for path in (parquet, saved, arrow):
        assert pick_reader(mm_host, path, None) == "hf_datasets"
        stream = iter_samples(mm_host, path, ctx(mm_host, tmp_path))
        assert not isinstance(stream, list)
        samples = list(stream)
        assert [s.id for s in samples] == ["a", "b"]
        assert samples[0].inputs == {"image": (str(tmp_path / "imgs" / "0.png"),)} and samples[1].inputs == {}
    report = validate([parquet], host=mm_host, data_root=tmp_path)
    assert report.ok and not report.issues, [i.message() for i in report.issues]


@pytest.mark.slow
@pytest.mark.parametrize("kind, modality", [("3d", "pointcloud"), ("2d", "image")])
def test_lamm_files_train_as_published(mm_host, lamm, tmp_path, tiny_llm, monkeypatch, kind, modality):
    """``mmkit train`` on LAMM's file, unedited, its data root being LAMM's 2D_Instruct / 3D_Instruct
    folder (the paths in LAMM's files are relative to it)."""
    from typer.testing import CliRunner

    from mmkit_cli.main import _register_commands, app

    from mmkit.modeling.persistence import load_model
    from mmkit.templates import TEMPLATES

    monkeypatch.setenv("COLUMNS", "200")
    # the template is chosen by name, or by a file (saved as its text, so the run outlives the file)
    template_file = tmp_path / "phi3.jinja"
    template_file.write_text(TEMPLATES["phi3"].source)
    template = "phi3" if kind == "2d" else str(template_file)
    _register_commands()
    result = CliRunner().invoke(app, [
        "train", "--llm", str(tiny_llm()), "--data", str(lamm[kind]), "--data-root", str(lamm[kind].parents[1]),
        "--modalities", modality, "--max-steps", "2", "--micro-batch-size", "2", "--lora-r", "4",
        "--template", template,
        "--output-dir", str(tmp_path / "run"), "--set", "tensorboard=false", "--set", "max_length=256"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    # no warning about any record (the tiny test tokenizer's vocabulary may draw a file-level one)
    warnings = [line for line in result.output.lower().splitlines() if "warning" in line]
    assert not [w for w in warnings if "record" in w or "key" in w], warnings
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r and np.isfinite(r["loss"]) for r in logs)
    saved = json.loads((tmp_path / "run" / "model" / "mmkit.json").read_text())["template"]
    assert saved == ("phi3" if kind == "2d" else TEMPLATES["phi3"].source)
    template_file.unlink()
    assembled = load_model(tmp_path / "run", mm_host)  # chat / eval load the run this way
    assert assembled.prompts.template == TEMPLATES["phi3"].source

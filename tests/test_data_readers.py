"""Dataset readers (generic, LLaVA, LAMM), JSON vs JSONL streaming, path rules, and the error for
each kind of bad input (always naming the file, and the record when there is one)."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest

from mmkit.data.readers import LAMM_SYSTEM_MESSAGES, iter_raw_records, read_generic, read_lamm, read_llava
from mmkit.records import ReadContext, Sample
from mmkit.data.sources import DataSource, iter_samples, pick_reader, read_mixture
from mmkit.errors import DataError, RecordSchemaError
from mmkit.specs import MarkerSpec, ModalitySpec

# Core-only specs shaped like the plugins' (no plugin needed to test the readers).
IMAGE = ModalitySpec(name="image", data_keys=("image",), markers=MarkerSpec("<image>", "<Img>", "</Img>"),
                     load="builtins:open", encoder="clip")
POINTCLOUD = ModalitySpec(name="pointcloud", data_keys=("pointcloud", "pcl"),
                          markers=MarkerSpec("<pointcloud>", "<Pcl>", "</Pcl>", aliases=("<pcl>",)),
                          load="builtins:open", encoder="pointnet2")


def ctx(**kwargs) -> ReadContext:
    return ReadContext(modalities={"image": IMAGE, "pointcloud": POINTCLOUD}, **kwargs)


def conv(*texts: str, speakers=("human", "gpt")) -> list[dict]:
    return [{"from": speakers[i % 2], "value": t} for i, t in enumerate(texts)]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


GOOD = [
    {"id": "one", "image": "imgs/a.png", "conversations": conv("<image>\nWhat is it?", "a cat")},
    {"id": "two", "conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                    {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Bye"}],
     "system": "Be brief."},
    {"image": ["x.png", "y.png"], "pointcloud": "p.npy",
     "conversations": conv("<pointcloud> then <image> and <image>", "same")},
]


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_generic_reader_jsonl_and_json_list(tmp_path, fmt):
    path = (write_jsonl if fmt == "jsonl" else write_json)(tmp_path / f"train.{fmt}", GOOD)
    samples = list(read_generic(path, context=ctx()))
    assert [s.id for s in samples] == ["one", "two", "2"]  # records without an id get their index
    one, two, three = samples
    assert one.inputs == {"image": (str(tmp_path / "imgs/a.png"),)}
    assert [(t.role, t.text) for t in one.turns] == [("user", "<image>\nWhat is it?"), ("assistant", "a cat")]
    assert one.source == str(path) and one.index == 0 and one.system is None
    assert [t.role for t in two.turns] == ["user", "assistant", "user", "assistant"]
    assert two.system == "Be brief." and two.inputs == {}
    # several inputs, several modalities: ordered by their first placeholder
    assert list(three.inputs) == ["pointcloud", "image"]
    assert three.inputs["image"] == (str(tmp_path / "x.png"), str(tmp_path / "y.png"))
    assert three.modalities == ("pointcloud", "image")


def test_llava_records(tmp_path):
    records = [{"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
                "conversations": conv("What are the colors of the bus in the image?\n<image>",
                                      "The bus in the image is white and red.",
                                      "What feature can be seen on the back of the bus?",
                                      "The back of the bus features an advertisement.")},
               {"id": "text-only", "conversations": conv("Hello", "Hi there")}]
    path = write_json(tmp_path / "llava.json", records)
    samples = list(read_llava(path, context=ctx(data_root=tmp_path / "images")))
    assert samples[0].inputs == {"image": (str(tmp_path / "images/coco/train2017/000000033471.jpg"),)}
    assert len(samples[0].turns) == 4 and samples[0].turns[-1].text.startswith("The back")
    assert samples[1].inputs == {}


def test_llava_reader_takes_only_the_image_key(tmp_path):
    record = {"id": "x", "image": "a.png", "pointcloud": "p.npy",
              "conversations": conv("<image> What is it?", "a cat")}
    sample = next(read_llava(write_jsonl(tmp_path / "d.jsonl", [record]), context=ctx()))
    assert list(sample.inputs) == ["image"]
    assert sample.meta["unknown_keys"] == ("pointcloud",)


def test_lamm_3d_records(tmp_path):
    records = [
        {"pcl": "3D_Instruct/objects/chair_0001.npy", "task_type": "classification3d", "src_dataset": "ModelNet40",
         "conversations": conv("<pcl>\nWhat is the category of this object?", "chair")},
        {"pcl": "scene.npy", "task_type": "something_new", "conversations": conv("Describe <pcl>", "a room")},
        {"image": "a.png", "task_type": "VQA", "conversations": conv("<image> Which one? (A) cat (B) dog", "(A)")},
    ]
    path = write_json(tmp_path / "LAMM_3d.json", records)
    chair, scene, vqa = read_lamm(path, context=ctx())
    assert chair.inputs == {"pointcloud": (str(tmp_path / "3D_Instruct/objects/chair_0001.npy"),)}
    assert chair.turns[0].text == "<pointcloud>\nWhat is the category of this object?"
    assert "<pcl>" not in chair.turns[0].text
    assert chair.system == LAMM_SYSTEM_MESSAGES["classification3d"]
    assert chair.meta["task_type"] == "classification3d" and chair.meta["src_dataset"] == "ModelNet40"
    assert scene.system is None  # "normal" and unknown task types: the chat template's system message, as in LAMM
    assert scene.turns[0].text == "Describe <pointcloud>"
    assert vqa.system == LAMM_SYSTEM_MESSAGES["VQA"] and vqa.inputs == {"image": (str(tmp_path / "a.png"),)}


def test_lamm_with_the_real_pointcloud_plugin(tmp_path, mm_host):
    context = ReadContext(modalities=mm_host.modalities())
    path = write_json(tmp_path / "lamm.json", [{"pcl": "o.npy", "task_type": "classification3d",
                                                 "conversations": conv("<pcl> What is it?", "chair")}])
    (sample,) = read_lamm(path, context=context)
    assert sample.inputs == {"pointcloud": (str(tmp_path / "o.npy"),)}
    assert sample.turns[0].text == mm_host.modality("pointcloud").markers.placeholder + " What is it?"


def test_lamm_record_without_its_input_is_not_trained_as_text_only(tmp_path):
    """LAMM's loaders encode the record's image / point cloud for every sample and skip a record
    lacking the modality key. Read as a text-only sample (with the 3-D task's system message), it
    would teach the model to answer about an input it never saw: it is a bad record instead."""
    records = [{"id": "with", "pcl": "chair.npy", "task_type": "classification3d",
                "conversations": conv("What is the category of this object?", "chair")},
               {"id": "without", "task_type": "classification3d", "src_dataset": "ShapeNet",
                "conversations": conv("What is the category of this object?", "chair")}]
    path = write_json(tmp_path / "LAMM_3dinstruct.json", records)
    problems: list[DataError] = []
    samples = list(read_lamm(path, context=ctx(on_bad_record=problems.append)))
    assert [s.id for s in samples] == ["with"], [(s.id, s.inputs, s.system) for s in samples]
    (problem,) = problems  # reported (skipped and counted), never dropped silently
    assert (problem.record, problem.record_id, problem.kind) == (1, "without", "schema")
    assert "'pcl'" in problem.reason and "'image'" in problem.reason  # the keys it expected
    with pytest.raises(RecordSchemaError, match=r"LAMM_3dinstruct.json record 1 \(id without\): no modality input"):
        list(read_lamm(path, context=ctx()))


def test_reader_detection(tmp_path, host):
    lamm = write_json(tmp_path / "lamm.json", [{"pcl": "o.npy", "task_type": "classification3d",
                                                 "conversations": conv("<pcl> What?", "chair")}])
    llava = write_json(tmp_path / "llava.json", [{"id": "1", "image": "a.png",
                                                   "conversations": conv("<image> What?", "cat")}])
    generic = write_jsonl(tmp_path / "generic.jsonl", [{"pointcloud": "p.npy", "meta": {},
                                                         "conversations": conv("<pointcloud> What?", "cube")}])
    assert pick_reader(host, lamm, None) == "lamm"
    assert pick_reader(host, llava, None) == "llava"
    assert pick_reader(host, generic, None) == "generic"
    assert pick_reader(host, lamm, "generic") == "generic"  # an explicit format wins
    unknown = write_jsonl(tmp_path / "other.jsonl", [{"text": "no conversations here"}])
    with pytest.raises(DataError, match=r"other.jsonl: no reader recognises this file"):
        pick_reader(host, unknown, None)
    (sample,) = iter_samples(host, lamm, ctx())
    assert sample.system == LAMM_SYSTEM_MESSAGES["classification3d"]


def test_mixture_weights(tmp_path, host):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": f"a{i}", "conversations": conv("Q", "A")} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": f"b{i}", "conversations": conv("Q", "A")} for i in range(4)])
    assert DataSource.parse(f"{b}:2.5") == DataSource(b, 2.5)
    assert DataSource.parse(str(a)) == DataSource(a, 1.0)
    samples = read_mixture(host, [DataSource(a, 0.5), DataSource.parse(f"{b}:2.5")], ctx(), seed=1)
    ids = [s.id for s in samples]
    assert sum(i.startswith("a") for i in ids) == 5 and len(set(i for i in ids if i.startswith("a"))) == 5
    assert sum(i.startswith("b") for i in ids) == 10
    assert {i for i in ids if i.startswith("b")} == {"b0", "b1", "b2", "b3"}
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no records"):
        read_mixture(host, [DataSource(empty)], ctx(), reader="generic")


def test_mixture_weight_that_drops_a_file_is_refused(tmp_path, host):
    """A weight that is not a finite positive number, or that rounds a file's share to no record
    at all, is an error naming the file (never a file silently left out of the mixture, nor a
    negative weight read as its fractional part: divmod(-0.3, 1) gives 0.7)."""
    from mmkit.errors import ConfigError

    a = write_jsonl(tmp_path / "a.jsonl", [{"id": f"a{i}", "conversations": conv("Q", "A")} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": f"b{i}", "conversations": conv("Q", "A")} for i in range(4)])
    for weight in (0.0, -0.3, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=rf"b\.jsonl.*weight {weight}"):
            read_mixture(host, [DataSource(a), DataSource(b, weight)], ctx(), seed=1)
    with pytest.raises(DataError, match=r"b\.jsonl: weight 0\.1 x 4 records rounds to no record"):
        read_mixture(host, [DataSource(a), DataSource(b, 0.1)], ctx(), seed=1)
    assert len(read_mixture(host, [DataSource(a), DataSource(b, 0.2)], ctx(), seed=1)) == 11  # 0.8 -> 1 record


def test_relative_paths_resolve_against_data_root(tmp_path):
    (tmp_path / "sub").mkdir()
    path = write_jsonl(tmp_path / "sub" / "d.jsonl", GOOD[:1])
    (sample,) = read_generic(path, context=ctx())
    assert sample.inputs["image"] == (str(tmp_path / "sub" / "imgs/a.png"),)  # default: the file's folder
    (sample,) = read_generic(path, context=ctx(data_root=tmp_path / "root"))
    assert sample.inputs["image"] == (str(tmp_path / "root" / "imgs/a.png"),)


@pytest.mark.parametrize("escape", ["../outside.png", "imgs/../../outside.png", "/etc/passwd"])
def test_paths_escaping_the_root_are_refused_unless_allowed(tmp_path, escape):
    root = tmp_path / "root"
    root.mkdir()
    path = write_jsonl(root / "d.jsonl", [GOOD[0], {"image": escape, "conversations": conv("<image> Hm?", "no")}])
    with pytest.raises(DataError, match=rf"d.jsonl record 1: path '{escape}' escapes the data root"):
        list(read_generic(path, context=ctx()))
    samples = list(read_generic(path, context=ctx(allow_outside_root=True)))
    assert len(samples) == 2
    inside = write_jsonl(root / "ok.jsonl", [{"image": "imgs/../b.png", "conversations": conv("<image> Hm?", "no")}])
    assert next(read_generic(inside, context=ctx())).inputs["image"] == (str(root / "imgs/../b.png"),)


def test_check_files(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD[:1])
    with pytest.raises(DataError, match=r"d.jsonl record 0 \(id one\): file not found: .*imgs/a.png"):
        list(read_generic(path, context=ctx(check_files=True)))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs/a.png").write_bytes(b"x")
    assert len(list(read_generic(path, context=ctx(check_files=True)))) == 1


BAD_RECORDS = [
    ("not an object", ["just", "a", "list"], r"record must be a JSON object, got list"),
    ("no conversations", {"id": "x", "image": "a.png"}, r"no 'conversations'"),
    ("empty conversations", {"conversations": []}, r"'conversations' must be a non-empty list"),
    ("turn not an object", {"conversations": ["hello", "hi"]}, r"turn 0 is not an object"),
    ("empty turn", {"conversations": conv("What?", "  ")}, r"turn 1 is empty"),
    ("missing text", {"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}, r"turn 0 is empty"),
    ("assistant first", {"conversations": conv("Hello", "Hi", speakers=("gpt", "human"))},
     r"turn 0 is from assistant, expected user"),
    ("two user turns", {"conversations": conv("Hello", "Again", speakers=("human", "human"))},
     r"turn 1 is from user, expected assistant"),
    ("ends with the user", {"conversations": conv("Hello", "Hi", "And?")}, r"the last turn must be the assistant's"),
    ("unknown speaker", {"conversations": conv("Hello", "Hi", speakers=("human", "robot"))},
     r"turn 1 has unknown speaker 'robot'"),
    ("placeholder without input", {"conversations": conv("<image> What?", "cat")},
     r"1 <image> placeholder\(s\) but no image input"),
    ("input without placeholder", {"image": "a.png", "conversations": conv("What?", "cat")},
     r"1 image input\(s\) but no <image> placeholder"),
    ("count mismatch", {"image": ["a.png", "b.png"], "conversations": conv("<image> What?", "cat")},
     r"1 <image> placeholder\(s\) for 2 image input\(s\)"),
    ("placeholder in the answer", {"image": "a.png", "conversations": conv("What?", "<image>")},
     r"placeholder <image> in an assistant turn"),
    ("modality under two keys", {"pointcloud": "a.npy", "pcl": "b.npy", "conversations": conv("<pcl> <pcl>", "x")},
     r"modality 'pointcloud' given under two keys"),
    ("empty path", {"image": "", "conversations": conv("<image> What?", "cat")},
     r"input path must be a non-empty string"),
    ("system not a string", {"system": 3, "conversations": conv("What?", "cat")}, r"'system' must be a string"),
]


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
@pytest.mark.parametrize(("case", "record", "message"), BAD_RECORDS, ids=[c[0] for c in BAD_RECORDS])
def test_each_bad_record_is_named(tmp_path, fmt, case, record, message):
    path = (write_jsonl if fmt == "jsonl" else write_json)(tmp_path / f"train.{fmt}", [GOOD[0], GOOD[1], record])
    with pytest.raises(DataError) as err:
        list(read_generic(path, context=ctx()))
    assert err.value.source == str(path) and err.value.record == 2
    assert re.match(rf"{re.escape(str(path))} record 2( \(id \w+\))?: ", str(err.value)), str(err.value)
    assert re.search(message, err.value.reason), str(err.value)


def test_not_json(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"conversations": []},\n {"oops": }]')
    with pytest.raises(DataError, match=rf"^{path}: not valid JSON: .* at line 2 column"):
        list(iter_raw_records(path))
    text = tmp_path / "d.txt"
    text.write_text("id,question,answer\n1,a,b\n")
    with pytest.raises(DataError, match=rf"^{text}: not JSON or JSONL"):
        list(iter_raw_records(text))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: file not found"):
        list(iter_raw_records(tmp_path / "nope.jsonl"))


def test_not_utf8_at_the_start(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"conversations": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=rf"^{path}: not UTF-8 text \(byte 19\)"):
        list(iter_raw_records(path))
    listed = tmp_path / "d.json"
    listed.write_bytes(b'[{"c": "' + b"a" * 5000 + b'\xff"}]')  # past the first 4 KiB
    with pytest.raises(DataError, match=rf"^{listed}: not UTF-8 text"):
        list(iter_raw_records(listed))


def _streamed(path: Path):
    """Records pulled one at a time; returns (those yielded before the error, the error)."""
    seen = []
    records = iter_raw_records(path)
    assert inspect.isgenerator(records)
    with pytest.raises(DataError) as err:
        for index, obj in records:
            seen.append(index)
    return seen, err.value


def test_jsonl_streams_and_names_a_late_bad_line(tmp_path):
    lines = [json.dumps({"id": i, "conversations": conv("Q", "A")}) for i in range(500)]
    lines.insert(300, "")  # blank lines are skipped and not counted as records
    lines[451] = lines[451][:-5]  # line 452, record 450: cut short
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines) + "\n")
    seen, err = _streamed(path)
    assert seen == list(range(450))  # everything before the bad line was yielded first
    assert err.record == 450 and "line 452 is not valid JSON" in str(err)
    assert str(err).startswith(f"{path} record 450:")


def test_jsonl_late_non_utf8_line_is_named_exactly(tmp_path):
    """A text-mode reader decodes 8 KiB ahead, so the error must come from per-line decoding to
    name the right record."""
    lines = [json.dumps({"id": i, "conversations": conv("Q" * 40, "A")}).encode() for i in range(400)]
    lines[300] = lines[300].replace(b'"A"', b'"\xe9"')  # Latin-1, not UTF-8
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    seen, err = _streamed(path)
    assert seen == list(range(300))
    assert err.record == 300 and "line 301 is not UTF-8" in str(err)


def test_records_stream_lazily_through_the_reader(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n" + "{broken\n")
    samples = read_generic(path, context=ctx())
    first = next(samples)
    assert isinstance(first, Sample) and first.id == "one"
    with pytest.raises(DataError, match=r"record 1: line 2 is not valid JSON"):
        next(samples)


def test_skipping_bad_records(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD[0], {"conversations": []}, GOOD[1],
                                              {"image": "a.png", "conversations": conv("What?", "cat")}])
    skipped = []
    samples = list(read_generic(path, context=ctx(on_bad_record=skipped.append)))
    assert [s.id for s in samples] == ["one", "two"]
    # the kinds callers act on are types (RecordSchemaError is a DataError with kind "schema")
    assert [(e.record, type(e), e.kind) for e in skipped] == [(1, RecordSchemaError, "schema"),
                                                              (3, DataError, "placeholder")]
    assert "no <image> placeholder" in skipped[1].reason


def test_a_system_message_given_twice_is_refused_not_dropped(tmp_path):
    """A ``system`` key and a leading system turn: keeping one silently dropped the other (the turn).
    No published layout combines them, so the record is refused, naming it; either one alone, or a
    ``null`` key beside a turn, is read."""
    turns = [{"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "Blue"}]
    turn = {"role": "system", "content": "Answer with one word."}
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"id": "twice", "system": "Answer in English.", "messages": [turn, *turns]},
        {"id": "key", "system": "Answer in English.", "messages": turns},
        {"id": "turn", "messages": [turn, *turns]},
        {"id": "null-key", "system": None, "messages": [turn, *turns]},
    ])
    with pytest.raises(RecordSchemaError, match=r"chat.jsonl record 0 \(id twice\): system message given twice"):
        list(read_generic(path, context=ctx()))
    skipped: list[DataError] = []
    samples = list(read_generic(path, context=ctx(on_bad_record=skipped.append)))
    assert [e.record_id for e in skipped] == ["twice"]
    assert [(s.id, s.system) for s in samples] == [("key", "Answer in English."), ("turn", "Answer with one word."),
                                                   ("null-key", "Answer with one word.")]


def test_a_reader_whose_detect_fails_on_a_record_does_not_claim_the_file(tmp_path, host):
    """A plugin reader's ``detect`` that raises on a record (written for its own format only) counts
    as not recognising it, as it does for the path: the file goes to the reader that does, never a
    raw traceback out of the detection."""
    from mmkit import ReaderSpec, hookimpl

    def fragile(path, record):
        return record["format"] == "mine"  # KeyError on any other record

    class Fragile:
        @hookimpl
        def mmkit_dataset_readers(self):
            return [ReaderSpec(name="fragile", read="mmkit.data.readers:read_generic", detect=fragile)]

    host.register(Fragile(), name="fragile")
    llava = write_json(tmp_path / "llava.json", [{"id": "a", "image": "x.png", "conversations": conv("<image> Q", "A")}])
    assert pick_reader(host, llava, None) == "llava"

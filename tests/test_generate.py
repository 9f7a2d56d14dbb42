"""Generation through transformers' ``generate``: greedy equals a step-by-step argmax, decoding
options behave, markers are never produced, answers stream, and inputs come from files or memory."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from mmkit.records import ReadContext, Sample, Turn
from mmkit.errors import ConfigError, InputError
from mmkit.generation import GenerationOptions

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture
def mm(assemble_model, randomize_lora, mm_host):
    """Image + point cloud, per-modality adapters, each distinct (so a mis-routed row shows)."""
    from mmkit.inference import LoadedModel

    assembled = assemble_model(("image", "pointcloud"), mode="per_modality")
    randomize_lora(assembled.model)
    with torch.no_grad():
        for p in assembled.model.projectors.parameters():  # features that change the answer
            p.mul_(20.0)
    return LoadedModel(assembled, mm_host)


def _samples(input_files):
    img, pcl = [str(p) for p in input_files["image"]], [str(p) for p in input_files["pointcloud"]]
    return [
        Sample("a", (Turn("user", "<image> What is shown here ?"),), {"image": (img[0],)}),
        Sample("b", (Turn("user", "hello world"),)),
        Sample("c", (Turn("user", "<pointcloud> Which shape is it ? <image>"),),
               {"pointcloud": (pcl[1],), "image": (img[2],)}),
    ]


def _argmax_reference(mm, sample, steps):
    """Greedy decoding the slow way: the whole sequence through the model at every step, no cache."""
    encoded = mm.prompts.encode_prompt(list(sample.turns))
    tensors = {m: mm.model.encoders[m].collate([mm.preprocess[m](Path(p)) for p in paths])
               for m, paths in sample.inputs.items()}
    ids = list(encoded.input_ids)
    out = []
    for _ in range(steps):
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = mm.model(input_ids=x, attention_mask=torch.ones_like(x), inputs=tensors,
                             modalities=[sample.modalities]).logits
        logits = logits[0, -1, : mm.assembled.first_new_token_id]
        token = int(logits.argmax())
        if token in mm.prompts.stop_token_ids:
            break
        out.append(token)
        ids.append(token)
    return mm.tokenizer.decode(out, skip_special_tokens=True).strip()


def test_greedy_batch_matches_a_step_by_step_argmax(mm, input_files):
    samples = _samples(input_files)
    batched = mm.generate_batch(samples, max_new_tokens=5)
    assert batched == [_argmax_reference(mm, s, 5) for s in samples]
    assert len(set(batched)) > 1 and all(batched)


def test_beams_route_each_row_to_its_adapter(mm, input_files):
    # transformers repeats each row once per beam: every copy must keep its row's adapter
    samples = _samples(input_files)
    options = GenerationOptions(max_new_tokens=5, num_beams=3)
    batched = mm.generate_batch(samples, options=options)
    assert batched == [mm.generate_batch([s], options=options)[0] for s in samples]


def test_sampling_is_seeded_and_differs_from_greedy(mm, input_files):
    img = str(input_files["image"][0])
    greedy = mm.generate("What is shown here ?", {"image": img}, max_new_tokens=8)
    draws = [mm.generate("What is shown here ?", {"image": img}, max_new_tokens=8, sample=True, temperature=3.0,
                         seed=s) for s in range(3)]
    again = mm.generate("What is shown here ?", {"image": img}, max_new_tokens=8, sample=True, temperature=3.0, seed=0)
    assert again == draws[0]
    assert len(set(draws)) > 1 or draws[0] != greedy
    penalised = mm.generate("What is shown here ?", {"image": img}, max_new_tokens=8, repetition_penalty=50.0)
    words = penalised.split()
    assert len(words) == len(set(words))  # a huge penalty: no generated token twice


def test_markers_and_padding_rows_are_never_generated(mm, input_files):
    """Suppression works on whatever lies at or above ``allowed_vocab``: take the token greedy picks
    first, forbid it and everything above, and it must not appear."""
    sample = _samples(input_files)[1]
    from mmkit.data.batching import Collator

    item = mm._item("b", sample.turns, None, {}, ())
    batch = Collator(pad_id=mm.tokenizer.pad_token_id, padding_side="left")([item])
    common = dict(stop_ids=set(), pad_id=mm.tokenizer.pad_token_id, max_new_tokens=6)
    free = mm.model.generate(batch.input_ids, batch.attention_mask, {}, batch.modalities,
                             allowed_vocab=mm.assembled.first_new_token_id, **common)[0]
    limit = max(free)
    assert limit > 10
    capped = mm.model.generate(batch.input_ids, batch.attention_mask, {}, batch.modalities,
                               allowed_vocab=limit, **common)[0]
    assert capped and max(capped) < limit


def test_stop_strings_cut_the_answer(mm, input_files):
    img = str(input_files["image"][0])
    full = mm.generate("What is shown here ?", {"image": img}, max_new_tokens=8)
    words = full.split()
    assert len(words) >= 3
    stop = words[2]
    cut = mm.generate("What is shown here ?", {"image": img}, max_new_tokens=8, stop=[stop])
    assert cut == full[: full.index(stop)].strip()


def test_streaming_yields_the_answer_piece_by_piece(mm, input_files):
    from transformers import TextIteratorStreamer

    img = str(input_files["image"][1])
    streamer = TextIteratorStreamer(mm.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault(
        "answer", mm.generate("What is shown here ?", {"image": img}, max_new_tokens=6, streamer=streamer)))
    worker.start()
    pieces = list(streamer)
    worker.join()
    assert len([p for p in pieces if p.strip()]) > 1
    assert "".join(pieces).strip() == result["answer"]
    with pytest.raises(ConfigError, match="one prompt at a time"):
        mm.generate("hi", num_beams=2, streamer=streamer)


def test_inputs_from_paths_bytes_and_memory_give_the_same_answer(mm, input_files):
    from PIL import Image

    img_path, pcl_path = input_files["image"][0], input_files["pointcloud"][0]
    question = "What is shown here ?"
    expected = mm.generate(question, {"image": [str(img_path)]}, max_new_tokens=6)
    pil = Image.open(img_path).convert("RGB")
    for value in (str(img_path), img_path, img_path.read_bytes(), pil, np.array(pil), torch.from_numpy(np.array(pil))):
        assert mm.generate(question, {"image": value}, max_new_tokens=6) == expected, type(value)
    both = mm.generate("compare the two", {"image": pil, "pointcloud": np.load(pcl_path)}, max_new_tokens=6)
    assert both == mm.generate("compare the two", {"image": str(img_path), "pointcloud": str(pcl_path)},
                               max_new_tokens=6)
    assert mm.generate("compare the two", {"pointcloud": pcl_path.read_bytes()}, max_new_tokens=6) == mm.generate(
        "compare the two", {"pointcloud": pcl_path}, max_new_tokens=6)


def test_generate_routes_by_the_first_placeholder_not_the_inputs_order(mm, input_files):
    """Training routes a sample to its first placeholder's adapter (readers order inputs by
    placeholder). ``generate`` with a question that already places its inputs must route the same
    way whatever order the caller's ``inputs`` dict (or ``mmkit chat``'s flags) lists them in."""
    img, pcl = str(input_files["image"][0]), str(input_files["pointcloud"][0])
    text = "<image> and <pointcloud> compare the two"
    # what training and evaluation do with this conversation (inputs in placeholder order)
    reference = mm.generate_batch([Sample("x", (Turn("user", text),), {"image": (img,), "pointcloud": (pcl,)})],
                                  max_new_tokens=6)[0]
    assert mm.generate(text, {"image": img, "pointcloud": pcl}, max_new_tokens=6) == reference
    # the same prompt (same tokens, same inputs), the inputs merely listed the other way round
    assert mm.generate(text, {"pointcloud": pcl, "image": img}, max_new_tokens=6) == reference
    assert mm.generate([Turn("user", text)], {"pointcloud": pcl, "image": img}, max_new_tokens=6) == reference


def test_inference_rewrites_a_placeholder_alias_as_training_does(assemble_model, mm_host, input_files, tmp_path):
    """The readers rewrite LAMM's ``<pcl>`` to the point-cloud placeholder; so must ``generate``, or
    the question "<pcl>\\nWhich shape is it ?" is prompted as "<pointcloud>\\n<pcl>\\n..." (a
    placeholder prepended for the input it thought unmarked, the alias left as text)."""
    from mmkit.data.readers import read_lamm
    from mmkit.inference import LoadedModel

    spec = mm_host.modality("pointcloud")
    assert "<pcl>" in spec.markers.aliases
    question = "<pcl>\nWhich shape is it ?"
    pcl = str(input_files["pointcloud"][0])
    path = tmp_path / "lamm.json"
    path.write_text(json.dumps([{"pcl": pcl, "task_type": "normal", "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": "a cube"}]}]))
    (sample,) = read_lamm(path, context=ReadContext(modalities=mm_host.modalities(), allow_outside_root=True))

    mm = LoadedModel(assemble_model(("pointcloud",), lora=False), mm_host)
    trained = mm.prompts.encode_prompt(sample.turns[:1], sample.system).input_ids
    seen: list[list[int]] = []

    def answer(items, options, streamer=None):  # the prompt, not the tiny model's answer
        seen.append(list(items[0]["input_ids"]))
        return [""]

    mm._answer = answer
    mm.generate(question, {"pointcloud": pcl})
    mm.generate([Turn("user", question)], {"pointcloud": pcl})  # a conversation: its turns alike
    assert len(seen) == 2
    for got in seen:
        assert got == trained, (mm.tokenizer.decode(got), mm.tokenizer.decode(trained))


def test_bad_inputs_and_options_are_named(mm, tmp_path):
    with pytest.raises(InputError, match="missing.png"):
        mm.generate("What is shown here ?", {"image": str(tmp_path / "missing.png")})
    with pytest.raises(InputError, match=r"in-memory ndarray \(4, 4, 3\).*uint8"):
        mm.generate("What is shown here ?", {"image": np.zeros((4, 4, 3), dtype=np.float32)})
    with pytest.raises(InputError, match="image bytes.*not readable"):
        mm.generate("What is shown here ?", {"image": b"not an image"})
    with pytest.raises(InputError, match="no 'audio' modality"):
        mm.generate("hi", {"audio": "a.wav"})
    with pytest.raises(ConfigError, match="temperature applies only when sampling"):
        GenerationOptions(temperature=0.5)
    with pytest.raises(ConfigError, match="top_p=1.5.*num_beams=0"):
        GenerationOptions(sample=True, top_p=1.5, num_beams=0)


def test_chat_command_streams_with_options(mm_host, assemble_model, input_files, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from mmkit.inference import load
    from mmkit.modeling.persistence import save_model
    from mmkit.plugins import set_host
    from mmkit_cli import chat_cmd

    assembled = assemble_model(("image",), mode="shared")
    save_model(tmp_path / "run", assembled, stage="instruct")
    set_host(mm_host)
    app = typer.Typer()
    chat_cmd.register(app)
    app.command("noop")(lambda: None)  # two commands: `chat` stays a subcommand
    monkeypatch.setenv("COLUMNS", "200")
    img = str(input_files["image"][0])
    expected = load(tmp_path / "run", host=mm_host).generate("What is shown here ?", {"image": img},
                                                             max_new_tokens=5, num_beams=2)
    for extra in ([], ["--no-stream"]):
        result = CliRunner().invoke(app, ["chat", str(tmp_path / "run"), "--image", img, "--max-new-tokens", "5",
                                          "--num-beams", "2", *extra, "What", "is", "shown", "here", "?"])
        assert result.exit_code == 0, result.output
        assert result.output.strip() == expected
    greedy = load(tmp_path / "run", host=mm_host).generate("What is shown here ?", {"image": img}, max_new_tokens=5)
    streamed = CliRunner().invoke(app, ["chat", str(tmp_path / "run"), "--image", img, "--max-new-tokens", "5",
                                        "What", "is", "shown", "here", "?"])
    assert streamed.exit_code == 0, streamed.output
    assert streamed.output.strip() == greedy
    refused = CliRunner().invoke(app, ["chat", str(tmp_path / "run"), "--top-k", "5", "hi"])
    assert isinstance(refused.exception, ConfigError) and "top_k applies only when sampling" in str(refused.exception)

"""Benchmark recipes, `mmkit eval RUN --benchmark` and `mmkit eval score`: the predictions saved
beside the scores reproduce every figure, and a recipe over the held-out file reproduces the
end-of-training evaluation exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from mmkit.errors import ConfigError, DataError
from mmkit.evaluation.recipe import load_recipe, packaged_file, parse_recipe, resolve_benchmark


def _cli(args: list[str]):
    from mmkit_cli.main import _register_commands, app

    _register_commands()
    return CliRunner().invoke(app, args, catch_exceptions=False)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- recipes ---------------------------------------------------------------------------------------
def test_recipe_errors_name_the_file_and_the_problem():
    base = {"name": "t", "data": "x.json", "metrics": ["accuracy"]}
    assert parse_recipe(base, "r.yaml").mode == "generate"
    for bad, message in [
        ({k: v for k, v in base.items() if k != "data"}, "missing 'data'"),
        ({**base, "modes": "choice"}, "unknown key"),
        ({**base, "mode": "rank"}, "mode 'rank'"),
        ({**base, "mode": "choice"}, "needs 'choices'"),
        ({**base, "mode": "choice", "choices": "gt_choices"}, "need format: lamm"),
        ({**base, "max_new_tokens": 0}, "max_new_tokens"),
        ({**base, "instruction": "{query"}, "instruction"),
        ({**base, "data": {"generate": "m:f", "count": 3}}, "data:"),
        ([1, 2], "mapping"),
    ]:
        with pytest.raises(ConfigError, match="r.yaml") as info:
            parse_recipe(bad, "r.yaml")
        assert message in str(info.value)


def test_shipped_demo_recipes_score_the_demos_held_out_files_as_training_does(mm_host):
    from mmkit.training.config import DEMO_DEFAULTS

    recipes = {r.name: r for r in resolve_benchmark("demo", mm_host, ["image", "pointcloud"])}
    assert {"digits", "shapes", "count_squares", "locate_square", "digits_choice"} <= set(recipes)
    for name, modality in (("digits", "image"), ("shapes", "pointcloud")):
        recipe = recipes[name]
        # the same file (relative to the run), prompts, metric and generation length as the
        # evaluation at the end of `mmkit train` (mmkit.training.recipe.plan_run)
        assert recipe.data == f"demo_data/test_{modality}.jsonl" and recipe.format == "conversations"
        assert recipe.mode == "generate" and recipe.metrics == ("accuracy",) and recipe.system is None
        assert recipe.max_new_tokens == DEMO_DEFAULTS["eval_max_new_tokens"]
    # a suite only runs the tasks whose modality the model has
    assert {r.modality for r in resolve_benchmark("demo", mm_host, ["pointcloud"])} == {"pointcloud"}
    with pytest.raises(ConfigError, match="registered: .*digits"):
        resolve_benchmark("no_such_benchmark", mm_host)
    with pytest.raises(ConfigError, match="no file"):
        packaged_file("mmkit_plugin_image:benchmarks/missing.yaml")


def test_generated_counting_and_locating_data(tmp_path):
    from mmkit_plugin_image.bench_data import SQUARE, counting, locating

    records = json.loads(counting(tmp_path, size=10, seed=0).read_text())
    assert [r["num"] for r in records] == [1, 2, 3, 4, 5] * 2
    for rec in records:  # the picture holds exactly `num` white squares
        pixels = np.asarray(Image.open(tmp_path / rec["image"]).convert("L"))
        assert int((pixels == 255).sum()) == rec["num"] * SQUARE * SQUARE
    rec = json.loads(locating(tmp_path, size=3, seed=0).read_text())[0]
    pixels = np.asarray(Image.open(tmp_path / rec["image"]).convert("L"))
    ys, xs = np.nonzero(pixels == 255)
    size = pixels.shape[0]
    assert rec["bbox"] == pytest.approx([xs.min() / size, ys.min() / size, (xs.max() + 1) / size,
                                         (ys.max() + 1) / size], abs=1e-4)


def test_lamm_benchmark_records_become_prompts_with_the_modality_first(mm_host, tmp_path):
    from mmkit.evaluation.benchmark import load_items

    meta = tmp_path / "meta_file"
    meta.mkdir()
    (meta / "VQA_x.json").write_text(json.dumps([
        {"id": 7, "image": "imgs/a.png", "query": "What colour?", "gt_choice": 1, "gt_choices": ["red", "blue"]},
        {"image": "imgs/b.png", "query": "And now?", "gt_choice": 0, "gt_choices": ["green", "red"]},
    ]))
    recipe = parse_recipe({"name": "vqa", "data": "meta_file/VQA_x.json", "format": "lamm", "input_root": ".",
                           "instruction": "{query} Options: {gt_choices}", "reference": ["gt_choice", "gt_choices"],
                           "mode": "choice", "choices": "gt_choices", "system": "Answer the question.",
                           "metrics": ["mc_accuracy"]}, "vqa.yaml")
    items = load_items(recipe, mm_host, ["image"], data_root=tmp_path, run_dir=None, work_dir=tmp_path)
    first = items[0]
    assert first.sample.id == "7" and items[1].sample.id == "1"
    assert first.sample.turns[0].text == "<image>\nWhat colour? Options: ['red', 'blue']"
    assert first.sample.inputs == {"image": (str(tmp_path / "imgs/a.png"),)}
    assert first.sample.system == "Answer the question."
    assert first.reference == {"gt_choice": 1, "gt_choices": ["red", "blue"]}
    assert first.options == ("red", "blue") and first.lettered
    bad = parse_recipe({"name": "v", "data": str(meta / "VQA_x.json"), "format": "lamm", "reference": "label",
                        "metrics": ["accuracy"]}, "v.yaml")
    with pytest.raises(DataError, match="record 0 .*no field.*label"):
        load_items(bad, mm_host, ["image"], data_root=None, run_dir=None, work_dir=tmp_path)
    # a model without the input's modality is told so; the input is never silently dropped
    with pytest.raises(DataError, match="needs modality image; the model has pointcloud"):
        load_items(recipe, mm_host, ["pointcloud"], data_root=tmp_path, run_dir=None, work_dir=tmp_path)
    (meta / "no_input.json").write_text(json.dumps([{"query": "q", "label": "x"}]))
    needs = parse_recipe({"name": "n", "data": str(meta / "no_input.json"), "format": "lamm", "modality": "image",
                          "metrics": ["accuracy"]}, "n.yaml")
    with pytest.raises(DataError, match="no image input"):
        load_items(needs, mm_host, ["image"], data_root=None, run_dir=None, work_dir=tmp_path)


# -- mmkit eval score ------------------------------------------------------------------------------
def test_eval_score_prints_the_metrics_dict(tmp_path):
    preds = _jsonl(tmp_path / "p.jsonl", [
        {"prediction": "a dog [0.1, 0.1, 0.5, 0.5]", "reference": [{"label": "dog", "bbox": [0.1, 0.1, 0.5, 0.5]}]},
        {"prediction": "nothing", "reference": [{"label": "cat", "bbox": [0.5, 0.5, 0.9, 0.9]}]},
    ])
    result = _cli(["eval", "score", str(preds), "--metric", "det2d", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"recall@0.5": 0.5, "precision@0.5": 1.0, "recall@0.25": 0.5,
                                         "precision@0.25": 1.0}
    table = _cli(["eval", "score", str(preds), "--metric", "det2d"])
    assert "recall@0.5" in table.output and "0.5000" in table.output


def test_eval_score_names_the_bad_record(tmp_path):
    from mmkit.evaluation.scoring import score_predictions_file

    preds = _jsonl(tmp_path / "p.jsonl", [{"prediction": "3", "reference": 3}, {"prediction": "2", "reference": "x"}])
    with pytest.raises(DataError, match=r"p.jsonl record 1: reference: a count must be a number"):
        score_predictions_file(preds, ["count"])
    _jsonl(preds, [{"prediction": "3"}])
    with pytest.raises(DataError, match="record 0: each record needs"):
        score_predictions_file(preds, ["count"])


# -- end to end on a saved run ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, mm_host, tiny_llm):
    """A saved tiny two-modality run (random LoRA, no training) and a held-out file for it."""
    import torch

    from mmkit.modeling.assemble import ModalityChoice, ModelConfig, assemble
    from mmkit.modeling.lora import LoraSettings
    from mmkit.modeling.persistence import save_model

    torch.manual_seed(0)
    assembled = assemble(ModelConfig(llm=str(tiny_llm("llama")),
                                     modalities=(ModalityChoice("image"), ModalityChoice("pointcloud")),
                                     lora=LoraSettings(r=4, alpha=8, dropout=0.0, mode="shared")), mm_host)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero adapters and projectors: answers that depend on the input
        for name, param in assembled.model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    run = tmp_path_factory.mktemp("run")
    save_model(run, assembled, stage="instruct")  # as mmkit train does: RUN/model/
    data = run / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)).save(data / f"i{i}.png")
        np.save(data / f"p{i}.npy", rng.normal(size=(300, 3)).astype(np.float32))
        rows.append({"id": f"img{i}", "image": f"i{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat digit is shown ?"}, {"from": "gpt", "value": str(i % 3)}]})
        rows.append({"id": f"pcl{i}", "pointcloud": f"p{i}.npy", "conversations": [
            {"from": "human", "value": "<pointcloud>\nWhich shape is it ?"},
            {"from": "gpt", "value": ["cube", "sphere", "cone"][i % 3]}]})
    held_out = _jsonl(data / "held.jsonl", rows)
    return run, held_out


def test_benchmark_reproduces_the_held_out_evaluation_and_eval_score_reproduces_it(saved_run, mm_host, tmp_path):
    from mmkit.evaluation.evaluate import evaluate_run, predict
    from mmkit.inference import load

    run, held_out = saved_run
    # the evaluation `mmkit train` runs at the end (16 new tokens, batches of 64)
    evaluated = evaluate_run(run, {"held": held_out}, host=mm_host)["held"]
    eval_json = (run / "eval.json").read_bytes()
    recipe = tmp_path / "held.yaml"
    recipe.write_text(yaml.safe_dump({"name": "held", "data": str(held_out), "metrics": ["accuracy", "exact_match"],
                                      "max_new_tokens": 16}))
    result = _cli(["eval", str(run), "--benchmark", str(recipe), "--limit", "100", "--json", "-"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)["held"]
    assert scores["n"] == 12
    assert scores["scores"]["accuracy"] == {"accuracy": evaluated["accuracy"]}
    out = run / "eval" / "held"
    assert json.loads((out / "scores.json").read_text())["held"] == scores
    assert (run / "eval.json").read_bytes() == eval_json  # the run's own evaluation is left alone

    rows = [json.loads(line) for line in (out / "held.predictions.jsonl").read_text().splitlines()]
    # the very answers of the training-time evaluation, in order, with their references
    from mmkit.records import ReadContext
    from mmkit.data.sources import iter_samples

    model = load(run, host=mm_host)
    ctx = ReadContext(modalities={m: mm_host.modality(m) for m in model.modalities})
    samples = list(iter_samples(mm_host, held_out, ctx))
    assert [r["prediction"] for r in rows] == predict(model, samples, batch_size=64, max_new_tokens=16)
    assert [r["reference"] for r in rows] == [s.turns[-1].text for s in samples]
    assert [r["id"] for r in rows] == [s.id for s in samples]

    # `mmkit eval score` on the saved predictions gives back every printed figure
    for metric, figures in scores["scores"].items():
        again = _cli(["eval", "score", str(out / "held.predictions.jsonl"), "--metric", metric, "--json"])
        assert json.loads(again.stdout) == figures

    # --limit, a named --out folder and the table
    limited = _cli(["eval", str(run), "--benchmark", str(recipe), "--limit", "3", "--out", str(tmp_path / "o")])
    assert limited.exit_code == 0, limited.output
    assert "accuracy" in limited.output and "held" in limited.output
    assert len((tmp_path / "o" / "held.predictions.jsonl").read_text().splitlines()) == 3


def test_choice_mode_picks_the_most_likely_option(saved_run, mm_host, tmp_path):
    import torch

    from mmkit.records import ReadContext
    from mmkit.data.sources import iter_samples
    from mmkit.evaluation.choice import _answer_turns, option_log_likelihoods
    from mmkit.inference import load

    run, held_out = saved_run
    model = load(run, host=mm_host)
    ctx = ReadContext(modalities={m: mm_host.modality(m) for m in model.modalities})
    sample = next(iter(iter_samples(mm_host, held_out, ctx)))
    options = ["cube", "sphere", "0"]
    scores = option_log_likelihoods(model, sample, options)
    # each option's summed log-likelihood, from the model's own loss on that one conversation
    for option, got in zip(options, scores, strict=True):
        import attrs

        encoded = model.prompts.encode_sample(attrs.evolve(sample, turns=_answer_turns(sample, option)))
        ids = torch.tensor([encoded.input_ids])
        labels = torch.tensor([encoded.labels])
        inputs = {m: model.model.encoders[m].collate([model.preprocess[m](Path(p)) for p in paths])
                  for m, paths in sample.inputs.items()}
        with torch.no_grad():
            loss = model.model(ids, torch.ones_like(ids), labels=labels, inputs=inputs,
                               modalities=[sample.modalities]).loss
        n = int((labels[:, 1:] != -100).sum())
        assert got == pytest.approx(-float(loss) * n, rel=1e-4, abs=1e-4)

    recipe = tmp_path / "choice.yaml"
    recipe.write_text(yaml.safe_dump({"name": "pick", "data": str(held_out), "mode": "choice", "choices": options,
                                      "metrics": ["accuracy"]}))
    result = _cli(["eval", str(run), "--benchmark", str(recipe), "--limit", "2", "--json", "-"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run / "eval" / "choice" / "pick.predictions.jsonl").read_text().splitlines()]
    assert rows[0]["prediction"] == options[int(np.argmax(scores))] and rows[0]["options"] == options
    assert all(r["prediction"] in options for r in rows)


def test_eval_data_keeps_its_ablation_and_leaves_the_runs_eval_json_alone(saved_run, mm_host):
    run, held_out = saved_run
    (run / "eval.json").write_text('{"training": "record"}')
    result = _cli(["eval", str(run), "--data", str(held_out), "--json", "-"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)["held"]
    assert printed["n"] == 12 and printed["ablated_modalities"] == ["image", "pointcloud"]
    assert 0 <= printed["ablated_accuracy"] <= 1
    assert (run / "eval.json").read_text() == '{"training": "record"}'
    out = run / "eval" / "held"
    assert json.loads((out / "eval.json").read_text()) == {"held": printed}
    rows = [json.loads(line) for line in (out / "held.predictions.jsonl").read_text().splitlines()]
    assert [(r["id"], r["prediction"]) for r in rows[:5]] == [(e["id"], e["prediction"]) for e in printed["examples"]]
    rescored = _cli(["eval", "score", str(out / "held.predictions.jsonl"), "--metric", "accuracy", "--json"])
    assert json.loads(rescored.stdout) == {"accuracy": printed["accuracy"]}
    ablated = [{"prediction": r["ablated_prediction"], "reference": r["reference"]} for r in rows]
    from mmkit.evaluation.metrics import accuracy

    assert accuracy([a["prediction"] for a in ablated], [a["reference"] for a in ablated]) == {
        "accuracy": printed["ablated_accuracy"]}


def test_eval_run_refuses_unclear_requests(saved_run, tmp_path):
    run, held_out = saved_run
    with pytest.raises(ConfigError, match="--data FILE or --benchmark"):
        _cli(["eval", str(run)])
    with pytest.raises(ConfigError, match="not a run directory"):
        _cli(["eval", str(tmp_path), "--benchmark", "demo"])
    with pytest.raises(ConfigError, match="benchmark recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_default_batch_size_is_the_runs_own(tmp_path):
    from mmkit_cli.eval_cmd import _run_eval_batch_size

    assert _run_eval_batch_size(tmp_path) == 64
    (tmp_path / "config.yaml").write_text("eval_batch_size: 7\n")
    assert _run_eval_batch_size(tmp_path) == 7


def _lamm_benchmark(root: Path) -> tuple[Path, Path]:
    """Two-record LAMM-Bench meta files laid out as LAMM publishes them (2D_Benchmark/meta_file/...,
    3D_Benchmark/meta_file/... with "./scannet_pcls/..." paths), with real image and point files."""
    rng = np.random.default_rng(0)
    d2, d3 = root / "2D_Benchmark", root / "3D_Benchmark"
    (d2 / "meta_file").mkdir(parents=True)
    (d2 / "imgs").mkdir()
    (d3 / "meta_file").mkdir(parents=True)
    (d3 / "scannet_pcls").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)).save(d2 / "imgs" / f"{i}.png")
        xyz_rgb = np.concatenate([rng.normal(size=(300, 3)), rng.uniform(size=(300, 3))], axis=1)  # N x 6 as ScanNet
        np.save(d3 / "scannet_pcls" / f"scene{i}.npy", xyz_rgb.astype(np.float32))
    box = {"label": "dog", "bbox": [0.1, 0.1, 0.5, 0.5]}
    fields2d = {
        "Classification_CIFAR10.json": {"label": "cat"},
        "Fine-grained_Classification_UCMerced.json": {"label": "forest"},
        "Detection_VOC2012.json": {"object": [box]},
        "Locating_VOC2012.json": {"object": [box]},
        "Counting_FSC147.json": {"num": 3},
        "Caption_flickr30k.json": {"sentences": ["a dog runs", "a brown dog"]},
        "OCR_SVT.json": {"word_list": ["hotel"]},
        "VQA_SQAimage.json": {"gt_choice": 1, "gt_choices": ["red", "blue"]},
        "VQA_AI2D.json": {"gt_choice": 0, "gt_choices": ["yes", "no"]},
    }
    for name, fields in fields2d.items():
        (d2 / "meta_file" / name).write_text(json.dumps([
            {"id": f"{name}-{i}", "image": f"imgs/{i}.png", "query": "What is shown here ?", **fields}
            for i in range(2)]))
    box3d = {"label": "chair", "bbox": [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]}
    fields3d = {"Detection_ScanNet.json": {"object": [box3d]}, "VG_ScanRefer.json": {"object": box3d},
                "VQA_ScanQA_multiplechoice.json": {"gt_choice": 0, "gt_choices": ["a table", "a bed"]}}
    for name, fields in fields3d.items():
        (d3 / "meta_file" / name).write_text(json.dumps([
            {"id": i, "pcl": f"./scannet_pcls/scene{i}.npy", "query": "Which shape is it ?", **fields}
            for i in range(2)]))
    return d2, d3


def test_lamm_bench_recipes_run_on_lamms_published_layout(saved_run, tmp_path):
    run, _ = saved_run
    d2, d3 = _lamm_benchmark(tmp_path)
    headline = {"accuracy": "accuracy", "det2d": "recall@0.5", "binary_loc": "binary_loc", "count": "mae",
                "bleu": "bleu4", "ocr_word_accuracy": "ocr_word_accuracy", "mc_accuracy": "mc_accuracy",
                "det3d": "recall@0.25", "grounding3d": "acc@0.25"}
    for suite, root, size in (("lamm2d", d2, 10), ("lamm3d", d3, 3)):
        result = _cli(["eval", str(run), "--benchmark", suite, "--data-root", str(root), "--json", "-"])
        assert result.exit_code == 0, result.output
        tasks = json.loads(result.stdout)
        assert len(tasks) == size
        out = run / "eval" / suite
        for task, r in tasks.items():
            assert r["n"] == 2, task
            ((metric, figures),) = r["scores"].items()
            assert next(iter(figures)) == headline[metric], task
            again = _cli(["eval", "score", str(out / r["predictions"]), "--metric", metric, "--json"])
            assert json.loads(again.stdout) == figures, task
    # likelihood choice over the record's options writes the lettered option
    rows = [json.loads(line) for line in (run / "eval" / "lamm2d" / "lamm_sqaimage_ppl.predictions.jsonl")
            .read_text().splitlines()]
    assert {r["prediction"] for r in rows} <= {"(A) red", "(B) blue"}


def test_a_named_task_of_a_modality_the_model_lacks_is_refused_before_its_data(mm_host, tmp_path):
    """`mmkit eval RUN --benchmark TASK` on a run without TASK's modality says so (suites skip such
    tasks), rather than reporting the task's data file as missing."""
    from types import SimpleNamespace

    from mmkit.evaluation.benchmark import run_benchmark

    recipe = parse_recipe({"name": "needs_image", "data": "nowhere/test.jsonl", "modality": "image",
                           "metrics": ["accuracy"]}, "needs_image.yaml")
    with pytest.raises(ConfigError, match="benchmark needs_image .*needs modality image; the model has pointcloud"):
        run_benchmark(SimpleNamespace(modalities=["pointcloud"]), [recipe], tmp_path / "out", mm_host,
                      run_dir=tmp_path)


# -- likelihood choice: the supervised-positions logits give what full logits give ------------------
def _full_logit_score(model, sample, option) -> float:
    """``sum log P(answer tokens | prefix)`` from the LLM's full logits, one conversation alone (no
    padding, no other rows): the definition choice.py implements."""
    import attrs
    import torch

    from mmkit.evaluation.choice import _answer_turns

    inputs = {m: [model.preprocess[m](Path(p)) for p in paths] for m, paths in sample.inputs.items()}
    encoded = model.prompts.encode_sample(attrs.evolve(sample, turns=_answer_turns(sample, option)))
    ids = torch.tensor([encoded.input_ids])
    labels = torch.tensor([encoded.labels])
    collated = {m: model.model.encoders[m].collate(items) for m, items in inputs.items()}
    net = model.model
    net.eval()
    with torch.no_grad():
        logits = net(ids, torch.ones_like(ids), inputs=collated, modalities=[sample.modalities]).logits
    logp = torch.log_softmax(logits[0].float(), dim=-1)
    total = 0.0
    for p in range(ids.shape[1] - 1):
        target = int(labels[0, p + 1])
        if target != -100:
            total += float(logp[p, target])
    return total


@pytest.fixture
def loaded(mm_host, tiny_llm, randomize_lora):
    """A two-modality model with per-modality LoRA on attention and on the output layer (the routed
    head keeps full logits in the model), all trainable weights non-zero."""
    import torch

    from mmkit.inference import LoadedModel
    from mmkit.modeling.assemble import ModalityChoice, ModelConfig, assemble
    from mmkit.modeling.lora import LoraSettings

    torch.manual_seed(0)
    assembled = assemble(ModelConfig(
        llm=str(tiny_llm("llama")), modalities=(ModalityChoice("image"), ModalityChoice("pointcloud")),
        lora=LoraSettings(r=4, alpha=8, dropout=0.0, mode="per_modality", targets=("q_proj", "v_proj", "lm_head"))),
        mm_host)
    randomize_lora(assembled.model, seed=3)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-zero projectors: scores depend on the inputs
        for name, param in assembled.model.named_parameters():
            if param.requires_grad and "lora_" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return LoadedModel(assembled, mm_host)


def _questions(mm_host, input_files):
    from mmkit.records import USER, Sample, Turn

    img = mm_host.modality("image").markers.placeholder
    pcl = mm_host.modality("pointcloud").markers.placeholder
    return [
        (Sample(id="q0", turns=(Turn(USER, f"{img}\nWhat digit is shown ?"),),
                inputs={"image": (str(input_files["image"][0]),)}),
         ["7", "seventy seven thousand", "a cube"]),
        (Sample(id="q1", turns=(Turn(USER, "Which shape is it ? Answer briefly please"),)),
         ["cube", "the sphere on the left"]),
        (Sample(id="q2", turns=(Turn(USER, f"{pcl}\nWhich shape is it ?"),),
                inputs={"pointcloud": (str(input_files["pointcloud"][1]),)}),
         ["cone", "sphere", "a large red cube with round corners", "2"]),
    ]


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_choice_scores_equal_full_logit_sums(loaded, mm_host, input_files, monkeypatch, side):
    """Several questions (an image one, a text-only one, a point-cloud one: three LoRA routes) with
    options of 2 to 8 tokens in one padded batch: each score is the summed log-probability of the
    option's tokens and its end of turn, exactly as full logits give it, whichever side is padded."""
    import functools

    import mmkit.data.batching as batching
    from mmkit.evaluation.choice import batch_log_likelihoods, best

    monkeypatch.setattr(batching, "Collator", functools.partial(batching.Collator, padding_side=side))

    questions = _questions(mm_host, input_files)
    batched = batch_log_likelihoods(loaded, questions)
    for (sample, options), got in zip(questions, batched, strict=True):
        want = [_full_logit_score(loaded, sample, o) for o in options]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
        assert best(got) == max(range(len(want)), key=lambda k: (want[k], -k))

    # the options really differ (a test that cannot fail would prove nothing)
    assert len({round(v, 3) for v in batched[2]}) == 4

    # mean=True (ChEF's PPL ranking, a recipe's choice_score: mean): the sum over the option's tokens
    import attrs

    from mmkit.evaluation.choice import _answer_turns

    means = batch_log_likelihoods(loaded, questions, mean=True)
    for (sample, options), sums, got in zip(questions, batched, means, strict=True):
        counts = [sum(1 for t in loaded.prompts.encode_sample(
            attrs.evolve(sample, turns=_answer_turns(sample, o))).labels[1:] if t != -100) for o in options]
        assert len(set(counts)) > 1  # options of different lengths: mean and sum differ
        assert got == pytest.approx([s / n for s, n in zip(sums, counts, strict=True)], rel=1e-4, abs=1e-4)


def test_one_question_alone_scores_as_in_a_batch(loaded, mm_host, input_files):
    """Padding to longer rows of other questions changes nothing."""
    from mmkit.evaluation.choice import batch_log_likelihoods, option_log_likelihoods

    questions = _questions(mm_host, input_files)
    batched = batch_log_likelihoods(loaded, questions)
    for (sample, options), together in zip(questions, batched, strict=True):
        assert option_log_likelihoods(loaded, sample, options) == pytest.approx(together, rel=1e-4, abs=1e-4)


# -- label synonyms: a recipe's table merged into the references (LAMM credits WordNet synonyms) ----
def test_cifar10_and_voc_label_synonyms_count(mm_host, tmp_path):
    """LAMM-Bench's CIFAR-10 meta file gives one label string ("automobile"); LAMM credits an answer
    naming a synonym of it (WordNet lemmas: "car" for automobile, "aeroplane" / "plane" for
    airplane). The shipped lamm_cifar10 / lamm_voc2012 recipes merge a synonyms table into the
    references, so "a car" is scored right, and the predictions file re-scores the same."""
    from mmkit.evaluation.benchmark import load_items, with_synonyms
    from mmkit.evaluation.metrics import accuracy, det2d

    meta = tmp_path / "meta_file"
    meta.mkdir()
    (meta / "Classification_CIFAR10.json").write_text(json.dumps([
        {"image": f"imgs/{i}.png", "query": "What is it?", "label": label}
        for i, label in enumerate(["automobile", "airplane", "cat"])]))
    recipe = load_recipe(packaged_file("mmkit_plugin_image:benchmarks/lamm_cifar10.yaml"))
    items = load_items(recipe, mm_host, ["image"], data_root=tmp_path, run_dir=None, work_dir=tmp_path)
    refs = [item.reference for item in items]
    assert refs[0][:2] == ["automobile", "car"] and "aeroplane" in refs[1] and refs[2] == "cat"
    assert accuracy(["It is a car.", "an aeroplane", "a cat"], refs) == {"accuracy": 1.0}
    assert accuracy(["It is a car.", "an aeroplane", "a cat"], ["automobile", "airplane", "cat"])["accuracy"] < 1
    # synonyms do not blur classes: a truck is still not an automobile
    assert accuracy(["a truck"], [refs[0]]) == {"accuracy": 0.0}

    voc = load_recipe(packaged_file("mmkit_plugin_image:benchmarks/lamm_voc2012.yaml"))
    objects = [{"label": "aeroplane", "bbox": [0, 0, 0.5, 0.5]}, {"label": "person", "bbox": [0.5, 0.5, 1, 1]}]
    ref = with_synonyms(objects, dict(voc.synonyms))
    assert ref[0]["label"][0] == "aeroplane" and "man" in ref[1]["label"] and objects[0]["label"] == "aeroplane"
    got = det2d(["an airplane [0, 0, 0.5, 0.5] and a man [0.5, 0.5, 1, 1]"], [ref])
    assert got["recall@0.5"] == 1.0 and got["precision@0.5"] == 1.0


def test_recipe_synonyms_are_checked(tmp_path):
    base = {"name": "t", "data": "x.json", "metrics": ["accuracy"]}
    assert parse_recipe({**base, "synonyms": {"car": ["auto"]}}, "t.yaml").synonyms == (("car", ("auto",)),)
    (tmp_path / "syn.yaml").write_text("car: [auto, motorcar]\n")
    assert parse_recipe({**base, "synonyms": "syn.yaml"}, str(tmp_path / "t.yaml")).synonyms == \
        (("car", ("auto", "motorcar")),)
    with pytest.raises(ConfigError, match="t.yaml: synonyms: a mapping"):
        parse_recipe({**base, "synonyms": {"car": "auto"}}, "t.yaml")
    with pytest.raises(ConfigError, match="synonyms .*nope.yaml"):
        parse_recipe({**base, "synonyms": "nope.yaml"}, str(tmp_path / "t.yaml"))
    with pytest.raises(ConfigError, match="choice_score 'max'"):
        parse_recipe({**base, "choice_score": "max"}, "t.yaml")


# -- mmkit eval --data: every file is evaluated -----------------------------------------------------
def test_eval_data_files_with_the_same_name_are_refused(tmp_path, monkeypatch):
    """``--data a/held.jsonl --data b/held.jsonl``: keyed by file stem, the first file was silently
    not evaluated (and its answers file overwritten). The clash is refused, naming both files,
    before anything is evaluated."""
    import mmkit

    seen = {}
    monkeypatch.setattr(mmkit, "evaluate", lambda output_dir, sources, **kwargs: seen.setdefault("sources", sources))
    files = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        path = tmp_path / folder / "held.jsonl"
        path.write_text("")
        files.append(path)
    with pytest.raises(ConfigError, match="same name 'held'") as caught:
        _cli(["eval", str(tmp_path), "--data", str(files[0]), "--data", str(files[1]), "--json", "-"])
    assert str(files[0]) in str(caught.value) and str(files[1]) in str(caught.value)
    assert not seen


# -- the held-out table: a metric whose headline figure has another name ---------------------------
def test_held_out_table_shows_a_metric_whose_headline_is_named_differently(mm_host):
    """``mmkit eval RUN --data F --metric count``: the result holds ``mae`` / ``ablated_mae`` (the
    headline), while print_eval looked up ``r["count"]`` (KeyError after the files were written) and
    ``ablated_count`` (the ablation would show as "-"). Same for bleu, det2d, det3d, grounding3d, pck."""
    from rich.console import Console

    from mmkit.evaluation.evaluate import evaluate_samples, print_eval
    from mmkit.records import ASSISTANT, USER, Sample, Turn

    class Answers:  # the model: "3" with its input, "0" with the input blanked
        def generate_batch(self, samples, *, max_new_tokens, ablate=()):
            return ["0" if ablate else "3" for _ in samples]

    samples = [Sample(id=str(i), turns=(Turn(USER, "<image>\nHow many?"), Turn(ASSISTANT, str(n))),
                      inputs={"image": ("x.png",)}) for i, n in enumerate((3, 5))]
    result = evaluate_samples(Answers(), samples, metric="count", host=mm_host)
    assert result["mae"] == 1.0 and result["ablated_mae"] == 4.0  # |3-3|, |3-5| ; |0-3|, |0-5|
    console = Console(record=True, width=120)
    print_eval({"held": result}, console)
    text = console.export_text()
    assert "1.000" in text and "4.000" in text

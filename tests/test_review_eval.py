"""Review of evaluation: likelihood choice scoring against full logits, and metrics against LAMM's
definitions (shared/reference/lamm.md), on small inputs with hand-computed expected values."""

from __future__ import annotations

from pathlib import Path

import pytest


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


def test_one_question_alone_scores_as_in_a_batch(loaded, mm_host, input_files):
    """Padding to longer rows of other questions changes nothing."""
    from mmkit.evaluation.choice import batch_log_likelihoods, option_log_likelihoods

    questions = _questions(mm_host, input_files)
    batched = batch_log_likelihoods(loaded, questions)
    for (sample, options), together in zip(questions, batched, strict=True):
        assert option_log_likelihoods(loaded, sample, options) == pytest.approx(together, rel=1e-4, abs=1e-4)


# -- multiple choice: LAMM's cascade (src/ChEF/metric/vqa.py LAMM_VQA) ------------------------------
def _mc(answer: str, gt_choice: int, choices: list[str]) -> float:
    from mmkit.evaluation.metrics import multiple_choice_accuracy

    return multiple_choice_accuracy([answer], [{"gt_choice": gt_choice, "gt_choices": choices}])["mc_accuracy"]


def test_the_answer_is_reads_a_letter_only_when_it_stands_alone():
    """LAMM's pattern is ``The answer is \\(?[A-E]\\)?\\W``: an upper-case letter on its own. "The
    answer is blue." names option A's text; reading the "b" of "blue" as option B scores a right
    answer wrong (and "a cat" is the article, not option A)."""
    from mmkit.evaluation.metrics import multiple_choice_letter

    assert multiple_choice_letter("The answer is blue.", ["blue", "red"]) == "A"
    assert _mc("The answer is blue.", 0, ["blue", "red"]) == 1.0
    assert multiple_choice_letter("I think the answer is a cat.", ["dog", "cat"]) == "B"
    assert _mc("I think the answer is a cat.", 1, ["dog", "cat"]) == 1.0
    # the letter forms still read
    assert multiple_choice_letter("The answer is (B).", ["blue", "red"]) == "B"
    assert multiple_choice_letter("The answer is B", ["blue", "red"]) == "B"


def test_answer_colon_reads_a_letter_only_when_it_stands_alone():
    from mmkit.evaluation.metrics import multiple_choice_letter

    assert multiple_choice_letter("ANSWER: Blue", ["blue", "red"]) == "A"
    assert multiple_choice_letter("ANSWER: B", ["blue", "red"]) == "B"


def test_an_answer_giving_several_letters_is_not_credited():
    """LAMM's check_option: every "(X)" (or "The answer is X") found must be the right letter; a
    hedged "(A) or (B)" is not credited for A (as naming every class is not, for accuracy)."""
    assert _mc("(A) or (B)", 0, ["red", "blue"]) == 0.0
    assert _mc("The answer is (A). No, the answer is (B).", 0, ["red", "blue"]) == 0.0
    assert _mc("(A) red, so (A).", 0, ["red", "blue"]) == 1.0


# -- 3-D IoU thresholds: LAMM's 3-D scripts count IoU > t (lamm.md: "IoU > 0.5", "> 0.25 and > 0.5") --
def test_3d_grounding_and_detection_need_iou_above_the_threshold():
    from mmkit.evaluation.metrics import det3d, grounding3d
    from mmkit.evaluation.parsing import iou3d

    truth = [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    half, quarter = [0.0, 0.0, 0.0, 1.0, 1.0, 2.0], [0.0, 0.0, 0.0, 1.0, 1.0, 4.0]
    assert iou3d(half, truth) == 0.5 and iou3d(quarter, truth) == 0.25  # exactly, in floats
    box = lambda b: "[" + ", ".join(str(v) for v in b) + "]"  # noqa: E731
    got = grounding3d([box(half), box(quarter)], [{"bbox3d": truth}, {"bbox3d": truth}])
    # IoU 0.5: > 0.25 but not > 0.5; IoU 0.25: neither
    assert got == {"acc@0.25": 0.5, "acc@0.5": 0.0}
    got = det3d([f"a chair {box(half)}"], [[{"label": "chair", "bbox3d": truth}]])
    assert got == {"recall@0.25": 1.0, "recall@0.5": 0.0}



def test_3d_grounding_reads_a_box_written_as_centre_and_size_groups():
    """LAMM's parse_bbox_3d takes the numbers of all ``[...]`` (then ``(...)``) groups and chunks them
    by 6 (lamm.md: "parsed from [...] / (...) groups ... chunked into ... 3D boxes (6)"): "at
    [1, 2, 0.5] with size [0.5, 0.5, 1]" is the box [1, 2, 0.5, 0.5, 0.5, 1]. Chunking each group
    alone finds no box: a right answer scored 0."""
    from mmkit.evaluation.metrics import grounding3d

    truth = {"bbox3d": [1.0, 2.0, 0.5, 0.5, 0.5, 1.0]}
    got = grounding3d(["The chair is at [1.0, 2.0, 0.5] with size [0.5, 0.5, 1.0]."], [truth])
    assert got == {"acc@0.25": 1.0, "acc@0.5": 1.0}

# -- counting ---------------------------------------------------------------------------------------
def test_count_reads_thousands_separators():
    """FSC147 counts run into the thousands; "1,200" is one number, not 1."""
    from mmkit.evaluation.metrics import count

    assert count(["There are 1,200 people.", "I count 2,345 beans", "12, 13 or 14"], [1200, 2345, 12]) == \
        {"mae": 0.0, "exact": 1.0}


def test_count_reads_compound_number_words():
    from mmkit.evaluation.metrics import count

    assert count(["twenty-three birds", "one hundred apples", "twenty five"], [23, 100, 25]) == \
        {"mae": 0.0, "exact": 1.0}


# -- classification: LAMM credits a lemma of the label ----------------------------------------------
def test_a_plural_label_accepts_its_singular():
    """LAMM lemmatises the answer's words (WordNet, nouns) and accepts the label's lemmas: the
    UCMerced class "buildings" is named by "a building", "storage tanks" by "a storage tank"."""
    from mmkit.evaluation.metrics import accuracy

    preds = ["This is a building.", "It shows a storage tank.", "a forest"]
    assert accuracy(preds, ["buildings", "storage tanks", "forest"]) == {"accuracy": 1.0}
    # still: naming another class of the set is not credited
    assert accuracy(["a building next to a forest", "a forest"], ["buildings", "forest"]) == {"accuracy": 0.5}



# -- OCR: LAMM's SVT metric (src/ChEF/metric/ocr.py SVT_OCR) -----------------------------------------
def test_svt_scores_the_share_of_the_images_words_read():
    """An SVT record's ``word_list`` holds every word of the image; LAMM scores a sample by the
    share of them found among the answer's words (then the mean over samples). Reading one word of
    three is 1/3, not full marks."""
    from mmkit.evaluation.metrics import ocr_word_accuracy

    got = ocr_word_accuracy(["The sign says HOTEL", "grand central hotel"],
                            [["hotel", "grand", "central"], ["hotel", "grand", "central"]])
    assert got["ocr_word_accuracy"] == pytest.approx((1 / 3 + 1) / 2)


# -- captioning: LAMM's BLEU-4 (pycocoevalcap, PTB tokenizer: lower-cased, punctuation removed) -----
def test_bleu_ignores_case_and_punctuation_as_lamms_scorer():
    """LAMM_Caption tokenises predictions and references with the COCO PTB tokenizer (lower case,
    punctuation dropped) before BLEU. A caption differing from its reference only by a capital and
    a full stop is a perfect match there; case-sensitive 13a scoring gives it about 68."""
    from mmkit.evaluation.metrics import bleu

    got = bleu(["A brown dog runs on the grass."], [["a brown dog runs on the grass"]])["bleu4"]
    assert got == pytest.approx(100.0)


# -- classification: a synonym of the label counts (lamm.md; LAMM checks WordNet synonyms) ----------
def test_cifar10_label_synonyms_count():
    """LAMM-Bench's CIFAR-10 meta file gives one label string ("automobile"); LAMM credits an answer
    naming a synonym of it (WordNet lemmas: "car" for automobile, "aeroplane" / "plane" for
    airplane). With ``reference: label`` no synonyms reach the metric, so "a car" is scored wrong."""
    from mmkit.evaluation.metrics import accuracy

    got = accuracy(["It is a car.", "an aeroplane", "a cat"], ["automobile", "airplane", "cat"])
    assert got == {"accuracy": 1.0}

# -- mmkit eval --data: every file is evaluated -----------------------------------------------------
def test_eval_data_files_with_the_same_name_are_all_evaluated_or_refused(tmp_path, monkeypatch):
    """``--data a/held.jsonl --data b/held.jsonl``: keyed by file stem, the first file was silently
    not evaluated (and its answers file overwritten). Both must be evaluated, or the clash refused."""
    import mmkit
    from typer.testing import CliRunner

    from mmkit_cli.main import _register_commands, app

    seen = {}

    def fake_evaluate(output_dir, sources, **kwargs):
        seen["sources"] = dict(sources)
        return {}

    monkeypatch.setattr(mmkit, "evaluate", fake_evaluate)
    files = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        path = tmp_path / folder / "held.jsonl"
        path.write_text("")
        files.append(path)
    _register_commands()
    try:
        result = CliRunner().invoke(app, ["eval", str(tmp_path), "--data", str(files[0]), "--data", str(files[1]),
                                          "--json", "-"], catch_exceptions=False)
    except mmkit.ConfigError as exc:  # a clear refusal is fine
        assert "held" in str(exc)
        return
    assert result.exit_code == 0, result.output
    assert sorted(map(str, seen["sources"].values())) == sorted(map(str, files))


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

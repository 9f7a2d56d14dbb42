"""The one prompt builder: labels, placeholder expansion, generation prompts, templates."""

from __future__ import annotations

import pytest

from mmkit.records import Sample, Turn
from mmkit.demo.llm import build_tokenizer
from mmkit.errors import ConfigError, DataError
from mmkit.modeling.tokens import add_marker_tokens
from mmkit.prompt import IGNORE_INDEX, PromptBuilder
from mmkit.templates import TEMPLATES
from mmkit.specs import MarkerSpec

MARKERS = {
    "image": MarkerSpec("<image>", begin="<Img>", end="</Img>"),
    "pointcloud": MarkerSpec("<pointcloud>", begin="<Pcl>", end="</Pcl>"),
}
TOKENS_PER_INPUT = {"image": 3, "pointcloud": 2}
CORPUS = ["What is shown here ? a cube sphere yes no compare the two and then Which shape is it ? "
          "Describe the input . user assistant system hello world :"]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: A template with no end-of-turn token: the builder must teach the model to stop with EOS.
PLAIN = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def make_tokenizer(template: str | None = "default"):
    tok = build_tokenizer(CORPUS)
    if template == "chatml":
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = CHATML
    elif template is None:
        tok.chat_template = None
    add_marker_tokens(tok, [t for spec in MARKERS.values() for t in spec.special_tokens()])
    return tok


def builder(template: str | None = "default", **kwargs) -> PromptBuilder:
    return PromptBuilder(make_tokenizer(template), MARKERS, TOKENS_PER_INPUT, **kwargs)


def sample(*texts: str, system: str | None = None, index: int = 0, **inputs) -> Sample:
    turns = tuple(Turn("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts))
    return Sample(id=f"s{index}", turns=turns, inputs={m: tuple(v) for m, v in inputs.items()}, system=system,
                  source="data/train.jsonl", index=index)


def toks(pb: PromptBuilder, ids) -> list[str]:
    return pb.tokenizer.convert_ids_to_tokens(list(ids))


def labelled_runs(labels: list[int]) -> list[list[int]]:
    """The contiguous runs of learned (non-ignored) label ids."""
    runs, current = [], []
    for lab in labels:
        if lab == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(lab)
    if current:
        runs.append(current)
    return runs


def test_labels_cover_exactly_the_assistant_turn_and_its_end_of_turn():
    pb = builder()
    enc = pb.encode_sample(sample("What is shown here ?", "a cube", system="Describe the input ."))
    assert len(enc.labels) == len(enc.input_ids)
    learned = [(tok, lab) for tok, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    # every learned position predicts its own token
    assert all(tok == lab for tok, lab in learned)
    assert toks(pb, [tok for tok, _ in learned]) == ["a", "cube", "<|end|>"]
    # the system and user turns, and the assistant header, are all ignored
    tokens = toks(pb, enc.input_ids)
    first_learned = enc.labels.index(next(lab for lab in enc.labels if lab != IGNORE_INDEX))
    assert tokens[first_learned - 1] == "<|assistant|>"
    assert "<|system|>" in tokens[:first_learned] and "shown" in tokens[:first_learned]
    assert enc.input_counts == {}


def test_every_assistant_turn_of_a_multi_turn_conversation_is_labelled():
    pb = builder()
    enc = pb.encode_sample(sample("What is shown here ?", "a cube", "Which shape is it ?", "yes no",
                                  "and then", "sphere"))
    runs = [toks(pb, run) for run in labelled_runs(enc.labels)]
    assert runs == [["a", "cube", "<|end|>"], ["yes", "no", "<|end|>"], ["sphere", "<|end|>"]]
    # user turns' words are never learned
    learned = {tok for run in runs for tok in run}
    assert not learned & {"What", "Which", "then"}


def test_placeholder_expands_to_begin_slots_end_and_is_never_learned():
    pb = builder()
    enc = pb.encode_sample(sample("<image>\nWhat is shown here ?", "a cube", image=["a.png"]))
    tokens = toks(pb, enc.input_ids)
    start = tokens.index("<Img>")
    assert tokens[start:start + 5] == ["<Img>", "<image>", "<image>", "<image>", "</Img>"]
    assert tokens.count("<image>") == TOKENS_PER_INPUT["image"]
    assert tokens[start - 1] == "<|user|>" and tokens[start + 5] == "What"
    assert all(lab == IGNORE_INDEX for lab in enc.labels[start:start + 5])
    assert enc.input_counts == {"image": 1}


def test_several_inputs_and_modalities_expand_in_placeholder_order():
    pb = builder()
    enc = pb.encode_sample(sample("<pointcloud> and <image> compare the two <image>", "no",
                                  image=["a.png", "b.png"], pointcloud=["c.npy"]))
    blocks = [t for t in toks(pb, enc.input_ids) if t in ("<Img>", "</Img>", "<Pcl>", "</Pcl>")]
    assert blocks == ["<Pcl>", "</Pcl>", "<Img>", "</Img>", "<Img>", "</Img>"]
    tokens = toks(pb, enc.input_ids)
    assert tokens.count("<image>") == 2 * 3 and tokens.count("<pointcloud>") == 2
    # the collator stacks inputs in this order: modality by first placeholder, then each in order
    assert list(enc.input_counts.items()) == [("pointcloud", 1), ("image", 2)]
    pcl = tokens.index("<Pcl>")
    assert tokens[pcl:pcl + 4] == ["<Pcl>", "<pointcloud>", "<pointcloud>", "</Pcl>"]


def test_input_count_must_match_placeholders():
    pb = builder()
    with pytest.raises(DataError, match=r"data/train.jsonl record 4 \(id s4\): 2 image input\(s\) but 1 placeholder"):
        pb.encode_sample(sample("<image> What is shown here ?", "a cube", index=4, image=["a.png", "b.png"]))


@pytest.mark.parametrize("template", ["default", "chatml"])
def test_encode_prompt_is_the_training_prefix_ending_with_the_generation_prompt(template):
    pb = builder(template)
    conversation = sample("<image> What is shown here ?", "a cube", "Which shape is it ?", "sphere",
                          image=["a.png"], system="Describe the input .")
    full = pb.encode_sample(conversation).input_ids
    header = ["<|assistant|>"] if template == "default" else ["<|im_start|>", "assistant"]
    for upto in (1, 3):  # prompts ending with the first and the second user turn
        prompt = pb.encode_prompt(conversation.turns[:upto], conversation.system)
        assert toks(pb, prompt.input_ids[-len(header):]) == header
        assert full[:len(prompt.input_ids)] == prompt.input_ids
        assert all(lab == IGNORE_INDEX for lab in prompt.labels)
        # what follows the prompt in training is exactly the learned answer
        answer = conversation.turns[upto].text.split()
        assert toks(pb, full[len(prompt.input_ids):len(prompt.input_ids) + len(answer)]) == answer
    assert pb.encode_prompt(conversation.turns[:1], conversation.system).input_counts == {"image": 1}


def test_over_length_sample_names_the_record():
    pb = builder(max_length=12)
    with pytest.raises(DataError) as err:
        pb.encode_sample(sample("<image> What is shown here ?", "a cube", index=7, image=["a.png"]))
    assert err.value.source == "data/train.jsonl" and err.value.record == 7
    assert "over the maximum 12" in str(err.value) and "including modality tokens" in str(err.value)
    # the same conversation fits once the limit allows it, and the limit counts the slots
    roomy = builder(max_length=200).encode_sample(sample("<image> What is shown here ?", "a cube", image=["a.png"]))
    tight = builder(max_length=len(roomy.input_ids)).encode_sample(
        sample("<image> What is shown here ?", "a cube", image=["a.png"]))
    assert tight.input_ids == roomy.input_ids
    with pytest.raises(DataError):
        builder(max_length=len(roomy.input_ids) - 1).encode_sample(
            sample("<image> What is shown here ?", "a cube", image=["a.png"]))


def test_tokenizers_own_chat_template_is_used():
    pb = builder("chatml")
    assert pb.template == CHATML
    enc = pb.encode_sample(sample("What is shown here ?", "a cube", "Which shape is it ?", "sphere"))
    tokens = toks(pb, enc.input_ids)
    assert tokens[:3] == ["<|im_start|>", "user", "What"]
    assert [toks(pb, run) for run in labelled_runs(enc.labels)] == [["a", "cube", "<|im_end|>"],
                                                                   ["sphere", "<|im_end|>"]]
    # the template's end-of-turn is the stop token; no EOS is appended after it
    im_end = pb.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in pb.stop_token_ids
    assert enc.input_ids[-1] == im_end and pb.tokenizer.eos_token_id not in enc.input_ids


def test_a_tokenizer_without_a_template_is_an_error_naming_the_likely_one():
    tok = make_tokenizer(None)
    assert tok.chat_template is None
    with pytest.raises(ConfigError, match=r"no chat template.*--template (phi3|vicuna_v1)"):
        PromptBuilder(tok, MARKERS, TOKENS_PER_INPUT)


def test_the_demo_tokenizer_speaks_phi3():
    pb = builder()
    assert pb.template == TEMPLATES["phi3"].source
    enc = pb.encode_sample(sample("What is shown here ?", "a cube"))
    assert toks(pb, enc.input_ids)[0] == "<|user|>"
    assert [toks(pb, r) for r in labelled_runs(enc.labels)] == [["a", "cube", "<|end|>"]]
    assert pb.tokenizer.convert_tokens_to_ids("<|end|>") in pb.stop_token_ids


def test_explicit_template_overrides_the_tokenizers():
    pb = PromptBuilder(make_tokenizer("chatml"), MARKERS, TOKENS_PER_INPUT, template="phi3")
    assert pb.template_ref == "phi3"
    enc = pb.encode_sample(sample("What is shown here ?", "a cube"))
    assert "<|im_start|>" not in toks(pb, enc.input_ids)
    assert toks(pb, enc.input_ids)[0] == "<|user|>"


def test_unknown_template_name_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"did you mean 'vicuna_v1'"):
        PromptBuilder(make_tokenizer(), MARKERS, TOKENS_PER_INPUT, template="vicuna-v1")


def test_a_template_file_is_read_and_saved_as_its_text(tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text(CHATML)
    tok = make_tokenizer("chatml")
    pb = PromptBuilder(tok, MARKERS, TOKENS_PER_INPUT, template=str(path))
    assert pb.template == CHATML and pb.template_ref == CHATML  # the run keeps working if the file moves
    assert PromptBuilder(tok, MARKERS, TOKENS_PER_INPUT, template=pb.template_ref).template == CHATML


def test_template_without_end_of_turn_learns_to_stop_with_eos():
    pb = PromptBuilder(make_tokenizer(None), MARKERS, TOKENS_PER_INPUT, template=PLAIN)
    enc = pb.encode_sample(sample("What is shown here ?", "a cube"))
    eos = pb.tokenizer.eos_token_id
    assert enc.input_ids[-1] == eos and enc.labels[-1] == eos
    assert [toks(pb, r) for r in labelled_runs(enc.labels)] == [["a", "cube", "</s>"]]
    assert pb.stop_token_ids == frozenset({eos})
    prompt = pb.encode_prompt(sample("What is shown here ?", "a cube").turns[:1])
    assert toks(pb, prompt.input_ids[-2:]) == ["assistant", ":"]
    assert enc.input_ids[:len(prompt.input_ids)] == prompt.input_ids


def test_markers_must_be_tokens_of_the_tokenizer():
    tok = build_tokenizer(CORPUS)  # markers never added
    with pytest.raises(ConfigError, match="<image>"):
        PromptBuilder(tok, {"image": MARKERS["image"]}, {"image": 3})


# -- contract 1.1: a token count per input ----------------------------------------------------------
def variable_builder(**kwargs) -> PromptBuilder:
    return PromptBuilder(make_tokenizer(), MARKERS, {"image": None, "pointcloud": 2}, **kwargs)


def test_variable_placeholders_expand_to_each_inputs_count_in_placeholder_order():
    pb = variable_builder()
    s = sample("<image> and <pointcloud> compare the two <image>", "no", image=["a.png", "b.png"],
               pointcloud=["p.npy"])
    enc = pb.encode_sample(s, {"image": [4, 1]})
    tokens = toks(pb, enc.input_ids)
    start = tokens.index("<Img>")
    assert tokens[start:start + 6] == ["<Img>", *["<image>"] * 4, "</Img>"]
    second = tokens.index("<Img>", start + 1)
    assert tokens[second:second + 3] == ["<Img>", "<image>", "</Img>"]
    assert tokens.count("<pointcloud>") == 2  # the fixed modality keeps its count
    assert enc.input_tokens == {"image": (4, 1), "pointcloud": (2,)}
    assert enc.input_counts == {"image": 2, "pointcloud": 1}
    # the same builder, other counts: only the slots change
    other = pb.encode_sample(s, {"image": [2, 3]})
    assert len(other.input_ids) == len(enc.input_ids) and toks(pb, other.input_ids).count("<image>") == 5
    # one batched call agrees with the single ones
    assert [e.input_ids for e in pb.encode_samples([s, s], [{"image": [4, 1]}, {"image": [2, 3]}])] == [
        enc.input_ids, other.input_ids]
    prompt = pb.encode_prompt(s.turns[:1], input_tokens={"image": [4, 1]})
    assert prompt.input_ids == enc.input_ids[:len(prompt.input_ids)]


def test_a_variable_modality_without_counts_or_with_wrong_counts_is_a_clear_error():
    pb = variable_builder()
    s = sample("<image> What is shown here ?", "a cube", index=3, image=["a.png"])
    with pytest.raises(ConfigError, match="'image' has a variable token count per input.*input_tokens"):
        pb.encode_sample(s)
    with pytest.raises(ConfigError, match="variable token count"):
        pb.encode_prompt(s.turns[:1])
    with pytest.raises(DataError, match="record 3.*2 image input\\(s\\) but 1 placeholder"):
        pb.encode_sample(s, {"image": [3, 3]})
    with pytest.raises(DataError, match="record 3.*1 image input\\(s\\) but at least 2 placeholder"):
        pb.encode_sample(sample("<image> <image> What is shown here ?", "a cube", index=3, image=["a.png"]),
                         {"image": [3]})
    with pytest.raises(ConfigError, match="fixed 2"):  # a count given for a fixed modality must agree
        pb.encode_sample(sample("<pointcloud> What is shown here ?", "a cube", pointcloud=["p.npy"]),
                         {"pointcloud": [5]})
    # text-only samples need no counts
    assert pb.encode_sample(sample("What is shown here ?", "a cube")).input_tokens == {}
    assert pb.variable_modalities == ("image",)


def test_the_one_length_rule_counts_each_inputs_tokens():
    roomy = variable_builder(max_length=500)
    s = sample("<image> What is shown here ?", "a cube", index=5, image=["a.png"])
    n = len(roomy.encode_sample(s, {"image": [10]}).input_ids)
    tight = variable_builder(max_length=n)
    assert len(tight.encode_sample(s, {"image": [10]}).input_ids) == n
    with pytest.raises(DataError, match=f"{n + 1} tokens including modality tokens \\(1 image x 11\\), over the "
                                        f"maximum {n}") as info:
        tight.encode_sample(s, {"image": [11]})
    assert info.value.kind == "too_long"
    assert tight.length_problem(n, {"image": (10,)}) is None
    assert "image 7+5" in tight.length_problem(n + 2, {"image": (7, 5)})
    assert tight.lengths([s], [{"image": [10]}]) == [(n, {"image": 1})]

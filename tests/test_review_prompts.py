"""Review: prompt building and training data, checked on real tokenizers and published record layouts.

Each test pins one silently wrong result found in review:

- a chat template without an end-of-turn token (a ``--template PATH`` such as Alpaca's or mmkit's
  own test template): the EOS the builder appends to teach stopping is preceded by the template's
  trailing separator (``\\n``), which no real tokenizer drops and which carries no label, so the model
  is taught ``P(EOS | answer, "\\n")`` but never to produce that ``"\\n"`` after the answer: it never
  learns where to stop.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mmkit.prompt import IGNORE_INDEX, PromptBuilder
from mmkit.records import Sample, Turn
from mmkit.specs import MarkerSpec

CACHE = Path(os.environ.get("MMKIT_TOKENIZER_CACHE", Path.home() / ".cache" / "mmkit" / "tokenizers"))
MARKERS = {"image": MarkerSpec("<image>", begin="<Img>", end="</Img>")}

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


def tokenizer(family: str):
    from transformers import AutoTokenizer

    from mmkit.modeling.tokens import add_marker_tokens

    path = CACHE / family
    if not (path / "tokenizer.json").is_file():
        message = f"real tokenizer {family!r} not in {CACHE}: run python scripts/fetch_tokenizers.py"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    tok = AutoTokenizer.from_pretrained(path)
    add_marker_tokens(tok, MARKERS["image"].special_tokens())
    return tok


# -- 1. a template without an end-of-turn token: EOS must follow the answer, nothing unlearned between ----
@pytest.mark.parametrize("template", [NO_END_OF_TURN, ALPACA], ids=["role-colon", "alpaca"])
@pytest.mark.parametrize("family", ["llama2", "llama3_1", "qwen3", "gemma3"])
def test_eos_taught_after_an_unclosed_answer_follows_the_answer(family, template):
    tok = tokenizer(family)
    pb = PromptBuilder(tok, MARKERS, {"image": 2}, template=template)
    sample = Sample(id="s", turns=(Turn("user", "<image>\nWhat is shown here?"), Turn("assistant", "a cube")),
                    inputs={"image": ("a.png",)})
    enc = pb.encode_sample(sample)
    eos = tok.eos_token_id
    assert enc.input_ids[-1] == eos and enc.labels[-1] == eos  # the builder teaches stopping with EOS
    first = next(i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX)
    tail = enc.labels[first:]
    gap = [tok.convert_ids_to_tokens(enc.input_ids[first + k]) for k, lab in enumerate(tail) if lab == IGNORE_INDEX]
    # from the answer's first token to EOS every token is learned: an unlearned token between the
    # answer and EOS (the template's "\n") is a step the model is never taught, so it never learns
    # to stop after the answer
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

    tok = tokenizer("llama3_1")
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


# -- the first token the model must generate is learned, whatever the answer starts with -----------------
@pytest.mark.parametrize("template", ["vicuna_v1", "llava_llama_2", "llama2", "mistral"])
@pytest.mark.parametrize("answer", ["3", "12 people", "[0.12, 0.40, 0.55, 0.91]", "日本です", "😀 yes"],
                         ids=["count", "number-first", "box", "cjk", "emoji"])
def test_the_first_generated_token_is_learned_for_any_answer(template, answer):
    """Llama-2's vocabulary has no ``▁3`` (digits, most CJK and emoji stand alone), so after
    ``ASSISTANT:`` an answer "3" tokenises as ``▁`` + ``3``. The ``▁`` carries only the template's
    space, not answer text, and was left unlearned, yet the inference prompt ends at ``ASSISTANT:``:
    the first token generated (``▁``) was never trained, for every counting answer, box list that
    opens with a digit, and most non-Latin answers (LLaVA-1.5 / Vicuna, LAMM counting)."""
    tok = tokenizer("llama2")
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

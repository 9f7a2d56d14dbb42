"""Review of what users take away from a trained run: exports must compute what mmkit computes and
prompt as the run was trained.

Each test builds a tiny run (random LoRA weights, so a lost adapter shows) and compares
mmkit's own forward / generation with the exported artefacts loaded by stock transformers / peft.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmkit.records import Turn

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")

TOL = 1e-4


def _randomize(model, seed: int = 1, scale: float = 0.2) -> None:
    """peft starts lora_B at zero (no effect): give every LoRA weight a distinct non-zero value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def _saved_run(assembled, root: Path) -> Path:
    """The assembled model saved as an instruct-stage run (what training writes)."""
    from mmkit.modeling.assemble import trainable_parameters
    from mmkit.modeling.persistence import save_model

    trainable_parameters(assembled.model, "instruct")  # what the trainer marks trainable (and saves)
    save_model(root, assembled, stage="instruct")
    return root


def _text_logits(mm, text: str) -> tuple[list[int], torch.Tensor]:
    ids = mm.prompts.encode_prompt([Turn("user", text)]).input_ids
    x = torch.tensor([ids])
    with torch.no_grad():
        out = mm.model(input_ids=x, attention_mask=torch.ones_like(x), modalities=[()])
    return ids, out.logits[0].float()


@pytest.fixture(scope="module")
def tied_llm(tmp_path_factory, tiny_llm) -> Path:
    """A tiny llama whose output head is tied to its input embeddings (as Qwen2.5-0.5B..3B,
    Llama-3.2-1B/3B and Gemma are)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    out = tmp_path_factory.mktemp("tied_llm")
    tok = AutoTokenizer.from_pretrained(str(tiny_llm("llama")))  # the test corpus' word-level tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=96, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True, initializer_range=0.25)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_merged_export_keeps_the_lora_of_a_tied_output_head(mm_host, tied_llm, tmp_path):
    """LoRA on ``lm_head`` of a tied-embedding LLM: the adapted head is no longer the input
    embedding. The merged export must keep the head's delta (untie), not re-tie it to the
    embeddings and drop it: its logits must be mmkit's."""
    from transformers import AutoModelForCausalLM

    from mmkit.export import export_run
    from mmkit.inference import load
    from mmkit.modeling.assemble import ModalityChoice, ModelConfig, assemble
    from mmkit.modeling.lora import LoraSettings

    torch.manual_seed(0)
    assembled = assemble(ModelConfig(llm=str(tied_llm), modalities=(ModalityChoice("image"),), max_length=256,
                                     lora=LoraSettings(r=4, alpha=8, dropout=0.0, mode="shared",
                                                       targets=("q_proj", "v_proj", "lm_head"))), mm_host)
    _randomize(assembled.model)
    run = _saved_run(assembled, tmp_path / "run")
    mm = load(run, host=mm_host)
    ids, logits = _text_logits(mm, "hello world what about this one")
    vocab = mm.assembled.first_new_token_id

    export_run(run, "merged", tmp_path / "merged", host=mm_host)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged" / "llm")).eval()
    with torch.no_grad():
        got = merged(input_ids=torch.tensor([ids])).logits[0].float()
    diff = (got[:, :vocab] - logits[:, :vocab]).abs().max().item()
    assert diff < TOL, f"merged export differs from mmkit by {diff:.3g} (the lm_head LoRA delta was lost)"


def test_exports_keep_the_trained_encoder_lora(mm_host, tiny_llm, tmp_path):
    """encoder_lora on a pretrained encoder: the export names the pretrained weights for the
    encoder, so its trained LoRA weights must be in the export too (or the format must refuse the
    run); otherwise whoever rebuilds from the export runs the un-adapted encoder."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from mmkit_plugin_image.encoder import _processor_class
    from mmkit_plugin_image.plugin import TINY_CLIP

    from mmkit.export import ExportRefused, export_run
    from mmkit.modeling.assemble import ModalityChoice, ModelConfig, assemble
    from mmkit.modeling.lora import LoraSettings

    clip = tmp_path / "clip"
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).save_pretrained(clip)  # a pretrained encoder, by path
    _processor_class()(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(clip)
    assembled = assemble(ModelConfig(llm=str(tiny_llm("llama")), max_length=256, encoder_lora=True,
                                     modalities=(ModalityChoice("image", encoder_pretrained=str(clip)),),
                                     lora=LoraSettings(r=4, alpha=8, dropout=0.0, mode="shared")), mm_host)
    _randomize(assembled.model)
    trained = {n: p.detach().clone() for n, p in assembled.model.encoders["image"].named_parameters()
               if "lora_" in n}
    assert trained
    run = _saved_run(assembled, tmp_path / "run")

    for fmt in ("peft", "merged"):
        out = tmp_path / fmt
        try:
            export_run(run, fmt, out, host=mm_host)
        except ExportRefused:
            continue  # refusing a run the format cannot hold is fine
        exported = [t for f in out.rglob("*.safetensors") for t in load_file(str(f)).values()]
        lost = [n for n, v in trained.items()
                if not any(t.shape == v.shape and torch.equal(t.float(), v.float()) for t in exported)]
        assert not lost, f"{fmt} export lost {len(lost)} trained encoder LoRA weights, e.g. {lost[:2]}"


def test_exported_tokenizers_render_the_runs_chat_template(mm_host, tiny_llm, tmp_path):
    """A run trained with a library template (--template vicuna_v1) on a tokenizer whose own chat
    template is another one: the model card says to prompt the merged LLM with
    ``tokenizer.apply_chat_template``, so the exported tokenizers must render the run's template
    (token for token what mmkit feeds the model), not the base tokenizer's."""
    from transformers import AutoTokenizer

    from mmkit.export import export_run
    from mmkit.inference import load
    from mmkit.modeling.assemble import ModalityChoice, ModelConfig, assemble
    from mmkit.modeling.lora import LoraSettings

    torch.manual_seed(0)
    assembled = assemble(ModelConfig(llm=str(tiny_llm("llama")), modalities=(ModalityChoice("image"),),
                                     template="vicuna_v1", max_length=256,
                                     lora=LoraSettings(r=4, alpha=8, dropout=0.0, mode="shared")), mm_host)
    run = _saved_run(assembled, tmp_path / "run")
    mm = load(run, host=mm_host)
    question = "hello world what about this one"
    expected = mm.prompts.encode_prompt([Turn("user", question)]).input_ids

    export_run(run, "merged", tmp_path / "merged", host=mm_host)
    export_run(run, "peft", tmp_path / "peft", host=mm_host)
    for folder in (tmp_path / "merged" / "llm", tmp_path / "peft" / "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        got = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert got == expected, (f"{folder.relative_to(tmp_path)} renders {tokenizer.decode(got)!r}; the run was "
                                 f"trained on {mm.tokenizer.decode(expected)!r}")

"""``mmkit export``: what each format writes loads in stock transformers / peft and computes what
mmkit computes (logits within 1e-4), and runs a format cannot hold are refused with the reason."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmkit.records import Turn

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

TOL = 1e-4
TRAIN = [("<image> What digit is shown ?", "7", 0), ("<image> What is shown here ?", "a red cube", 1)]
QUESTION = "What digit is shown ?"
TEXT_PROMPT = "hello world , what about this one ?"


def _train(assembled, mm_host, samples, steps: int = 6) -> list[float]:
    """A few real optimizer steps on the instruct stage (projectors, marker rows, LoRA)."""
    from mmkit.data.batching import Collator, collate_fns
    from mmkit.inference import LoadedModel
    from mmkit.modeling.assemble import trainable_parameters

    mm = LoadedModel(assembled, mm_host)
    model = assembled.model
    params = [p for group in trainable_parameters(model, "instruct").values() for p in group]
    optimizer = torch.optim.AdamW(params, lr=3e-2)
    items = []
    for s in samples:
        enc = assembled.prompts.encode_sample(s)
        items.append({"id": s.id, "input_ids": enc.input_ids, "labels": enc.labels,
                      "inputs": {m: [mm.preprocess[m](Path(p)) for p in paths] for m, paths in s.inputs.items()},
                      "modalities": s.modalities})
    batch = Collator(pad_id=assembled.tokenizer.pad_token_id, padding_side="right",
                     collate=collate_fns(model.encoders))(items)
    model.train()
    losses = []
    for _ in range(steps):
        out = model(**batch.model_kwargs())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    model.eval()
    return losses


def _sample(sid, text, answer, **inputs):
    from mmkit.records import Sample

    return Sample(sid, (Turn("user", text), Turn("assistant", answer)), {m: tuple(map(str, v)) for m, v in inputs.items()})


def _make_run(tmp_path_factory, mm_host, tiny_llm, input_files, modalities, mode, name):
    from mmkit.modeling.assemble import ModalityChoice, ModelConfig, assemble
    from mmkit.modeling.lora import LoraSettings
    from mmkit.modeling.persistence import save_model

    torch.manual_seed(0)
    config = ModelConfig(llm=str(tiny_llm("llama")), modalities=tuple(ModalityChoice(m) for m in modalities),
                         lora=LoraSettings(r=4, alpha=8, dropout=0.0, mode=mode), max_length=256)
    assembled = assemble(config, mm_host)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every adapter distinct (peft starts B at zero), so a wrong merge shows
        for pname, param in assembled.model.named_parameters():
            if "lora_" in pname:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    images = input_files["image"]
    samples = [_sample(f"i{i}", q, a, image=[images[k]]) for i, (q, a, k) in enumerate(TRAIN)]
    if "pointcloud" in modalities:
        clouds = input_files["pointcloud"]
        samples += [_sample("p", "<pointcloud> Which shape is it ?", "a cube", pointcloud=[clouds[0]]),
                    _sample("t", "hello world", "yes")]
    losses = _train(assembled, mm_host, samples)
    assert losses[-1] < losses[0]  # it learned something
    run = tmp_path_factory.mktemp(name)
    save_model(run, assembled, stage="instruct")
    return run


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, mm_host, tiny_llm, input_files):
    return _make_run(tmp_path_factory, mm_host, tiny_llm, input_files, ("image",), "shared", "image_run")


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, mm_host, tiny_llm, input_files):
    return _make_run(tmp_path_factory, mm_host, tiny_llm, input_files, ("image", "pointcloud"), "per_modality",
                     "mixed_run")


@pytest.fixture(scope="module")
def loaded(mm_host):
    from mmkit.inference import load

    cache = {}

    def get(run):
        if run not in cache:
            cache[run] = load(run, host=mm_host)
        return cache[run]

    return get


def _mmkit_logits(mm, text: str, inputs: dict | None = None) -> tuple[list[int], torch.Tensor]:
    """mmkit's logits for the generation prompt of ``text`` (placeholders prepended as generate does)."""
    inputs = {m: list(v) for m, v in (inputs or {}).items()}
    turns = [Turn("user", mm._with_placeholders(text, inputs))]
    enc = mm.prompts.encode_prompt(turns)
    ids = torch.tensor([enc.input_ids])
    tensors = {m: mm.model.encoders[m].collate([mm.prepare(m, v) for v in vs]) for m, vs in inputs.items()}
    with torch.no_grad():
        out = mm.model(input_ids=ids, attention_mask=torch.ones_like(ids), inputs=tensors,
                       modalities=[tuple(inputs)])
    return enc.input_ids, out.logits[0].float()


def _group_readable(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044


HF_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder, image, question, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(image), text=prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
        generated = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    new = generated[0, inputs["input_ids"].shape[1]:]
    print(json.dumps({"input_ids": inputs["input_ids"][0].tolist(), "logits": logits.tolist(),
                      "answer": processor.decode(new, skip_special_tokens=True).strip(),
                      "mmkit_imported": any(m.split(".")[0] == "mmkit" for m in sys.modules)}))
""")


def _export_cli(*args: str):
    """``mmkit export ...`` in-process (the command as cli/main.py registers it)."""
    import typer
    from typer.testing import CliRunner

    from mmkit_cli import export_cmd

    app = typer.Typer()
    export_cmd.register(app)
    app.command("noop")(lambda: None)  # two commands: `export` stays a subcommand
    return CliRunner().invoke(app, ["export", *args])


def test_llava_hf_export_loads_in_stock_transformers_and_matches_mmkit(image_run, loaded, input_files, tmp_path,
                                                                        mm_host):
    from mmkit.plugins import set_host

    set_host(mm_host)
    out = tmp_path / "llava"
    done = _export_cli(str(image_run), "--to", "llava-hf", str(out))
    assert done.exit_code == 0, done.output
    assert "model.safetensors" in done.output and (out / "README.md").is_file()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMKIT_")}
    config = json.loads((out / "config.json").read_text())
    mm = loaded(image_run)
    assert config["model_type"] == "llava"
    assert config["image_token_index"] == mm.tokenizer.convert_tokens_to_ids("<image>")
    assert config["vision_feature_select_strategy"] == "default"  # the run drops CLS
    assert _group_readable(out) and _group_readable(out / "model.safetensors")

    held_out = input_files["image"][2]  # never trained on
    script = tmp_path / "load_llava.py"
    script.write_text(HF_SCRIPT)
    hf = subprocess.run([sys.executable, str(script), str(out), str(held_out), QUESTION, "8"],
                        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert hf.returncode == 0, hf.stderr[-3000:]
    got = json.loads(hf.stdout.strip().splitlines()[-1])
    assert got["mmkit_imported"] is False

    ids, logits = _mmkit_logits(mm, QUESTION, {"image": [str(held_out)]})
    assert got["input_ids"] == ids  # same prompt, begin/end markers and 16 image tokens included
    vocab = mm.assembled.first_new_token_id
    hf_logits = torch.tensor(got["logits"])
    diff = (hf_logits[:, :vocab] - logits[:, :vocab]).abs().max().item()
    print(f"llava-hf max |logit diff| = {diff:.2e}")
    assert diff < TOL
    answer = mm.generate(QUESTION, {"image": str(held_out)}, max_new_tokens=8)
    assert answer and got["answer"] == answer


def test_peft_adapters_load_with_peft_and_merged_llm_matches_mmkit(image_run, loaded, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmkit.export import export_run

    mm = loaded(image_run)
    ids, logits = _mmkit_logits(mm, TEXT_PROMPT)
    vocab = mm.assembled.first_new_token_id
    assert max(ids) < vocab  # a text-only prompt: the base LLM alone can take it

    files = export_run(image_run, "peft", tmp_path / "peft")
    assert {"adapters/shared/adapter_config.json", "adapters/shared/adapter_model.safetensors", "README.md",
            "projectors.safetensors", "markers.safetensors", "mmkit_export.json"} <= set(files)
    index = json.loads((tmp_path / "peft" / "mmkit_export.json").read_text())
    base_path = index["base_llm"]
    named = json.loads((tmp_path / "peft" / "adapters" / "shared" / "adapter_config.json").read_text())
    assert Path(named["base_model_name_or_path"]).is_absolute()  # loads from any working directory
    assert Path(named["base_model_name_or_path"]).resolve() == Path(base_path).resolve()
    peft_llm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path),
                                         str(tmp_path / "peft" / "adapters" / "shared")).eval()
    with torch.no_grad():
        peft_logits = peft_llm(input_ids=torch.tensor([ids])).logits[0].float()
    peft_diff = (peft_logits[:, :vocab] - logits[:, :vocab]).abs().max().item()
    projectors = load_file(str(tmp_path / "peft" / "projectors.safetensors"))
    for name, value in mm.model.projectors["image"].state_dict().items():
        assert torch.equal(projectors[f"image.{name}"], value)
    markers = load_file(str(tmp_path / "peft" / "markers.safetensors"))["embeddings"]
    assert torch.equal(markers, mm.model.embeddings.new_tokens.detach())
    assert index["markers"]["<image>"] == mm.tokenizer.convert_tokens_to_ids("<image>")

    export_run(image_run, "merged", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged" / "llm")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "merged" / "llm"))
    assert tokenizer.convert_tokens_to_ids("<Img>") == mm.tokenizer.convert_tokens_to_ids("<Img>")
    with torch.no_grad():
        merged_logits = merged(input_ids=torch.tensor([ids])).logits[0].float()
        # the marker rows moved into the vocabulary: embedding them gives mmkit's trained rows
        marker_rows = merged.get_input_embeddings()(torch.arange(vocab, vocab + markers.shape[0]))
    merged_diff = (merged_logits[:, :vocab] - logits[:, :vocab]).abs().max().item()
    print(f"peft max |logit diff| = {peft_diff:.2e}; merged = {merged_diff:.2e}")
    assert peft_diff < TOL and merged_diff < TOL
    assert torch.equal(marker_rows, markers)
    assert merged.generation_config.suppress_tokens == list(range(vocab, merged.config.vocab_size))
    assert (tmp_path / "merged" / "README.md").read_text().startswith("# mmkit run: merged LLM")


def test_image_pointcloud_run_exports_peft_and_merged_and_llava_is_refused(mixed_run, loaded, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mmkit.errors import ConfigError
    from mmkit.export import ExportRefused, export_run

    mm = loaded(mixed_run)
    assert mm.adapters == ["image", "pointcloud", "text"]
    files = export_run(mixed_run, "peft", tmp_path / "peft")
    base = json.loads((tmp_path / "peft" / "mmkit_export.json").read_text())["base_llm"]
    ids, logits = _mmkit_logits(mm, TEXT_PROMPT)  # a text-only prompt: the text adapter
    vocab = mm.assembled.first_new_token_id
    outputs = {}
    for name in mm.adapters:
        assert f"adapters/{name}/adapter_model.safetensors" in files
        llm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                        str(tmp_path / "peft" / "adapters" / name)).eval()
        with torch.no_grad():
            outputs[name] = llm(input_ids=torch.tensor([ids])).logits[0, :, :vocab].float()
    assert (outputs["text"] - logits[:, :vocab]).abs().max().item() < TOL
    assert (outputs["image"] - logits[:, :vocab]).abs().max().item() > 1e-3  # adapters really differ

    with pytest.raises(ConfigError, match="3 LoRA adapters.*--adapter"):
        export_run(mixed_run, "merged", tmp_path / "ambiguous")
    export_run(mixed_run, "merged", tmp_path / "merged", adapter="text")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged" / "llm")).eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=torch.tensor([ids])).logits[0, :, :vocab].float()
    assert (merged_logits - logits[:, :vocab]).abs().max().item() < TOL
    assert json.loads((tmp_path / "merged" / "mmkit_export.json").read_text())["merged_adapter"] == "text"

    with pytest.raises(ExportRefused, match="llava-hf format cannot hold this run: .*image, pointcloud"):
        export_run(mixed_run, "llava-hf", tmp_path / "llava")
    assert not (tmp_path / "llava").exists()


def test_llava_refuses_runs_it_cannot_express(mm_host, assemble_model, randomize_lora, tmp_path):
    from mmkit_plugin_image.export_llava import why_not

    from mmkit.export import ExportRefused, export_run
    from mmkit.modeling.persistence import save_model

    image = {"encoder": "clip", "projector": "mlp", "projector_options": {}}
    assert why_not({"modalities": {"image": image}}) is None
    assert why_not({"modalities": {"image": {**image, "projector_options": {"depth": 1}}}}) is None
    assert "resampler" in why_not({"modalities": {"image": {**image, "projector": "resampler"}}})
    assert "depth 3" in why_not({"modalities": {"image": {**image, "projector_options": {"depth": 3}}}})
    assert "encoder" in why_not({"modalities": {"image": {**image, "encoder": "siglip"}}})
    assert "LoRA" in why_not({"modalities": {"image": image}, "encoder_lora": True})

    # per-modality adapters: text-only prompts would use another adapter than image prompts
    assembled = assemble_model(("image",), mode="per_modality")
    randomize_lora(assembled.model)
    save_model(tmp_path / "run", assembled, stage="instruct")
    with pytest.raises(ExportRefused, match="per-modality LoRA adapters .*differ"):
        export_run(tmp_path / "run", "llava-hf", tmp_path / "out", host=mm_host)
    assert not (tmp_path / "out").exists()


def test_export_errors_name_the_problem(image_run, tmp_path, mm_host):
    from mmkit.errors import ConfigError, PluginError
    from mmkit.export import export_run

    with pytest.raises(PluginError, match="no exporter named 'onnx'.*llava-hf.*merged.*peft"):
        export_run(image_run, "onnx", tmp_path / "x", host=mm_host)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty.*--overwrite"):
        export_run(image_run, "peft", tmp_path / "full", host=mm_host)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_llava_hf_linear_projector_and_kept_cls(mm_host, tiny_llm, input_files, tmp_path):
    """A single-linear projector (LLaVA's linear_2 becomes the identity) and a CLS token kept
    (strategy 'full') on an earlier feature layer: the export still computes what mmkit does."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmkit.export import export_run
    from mmkit.inference import load
    from mmkit.modeling.assemble import ModalityChoice, ModelConfig, assemble
    from mmkit.modeling.lora import LoraSettings
    from mmkit.modeling.persistence import save_model

    torch.manual_seed(0)
    choice = ModalityChoice("image", projector="linear", encoder_options={"drop_cls": False, "feature_layer": -2})
    assembled = assemble(ModelConfig(llm=str(tiny_llm("llama")), modalities=(choice,),
                                     lora=LoraSettings(r=4, alpha=8, dropout=0.0, mode="shared"), max_length=256),
                         mm_host)
    _train(assembled, mm_host, [_sample("i", "<image> What digit is shown ?", "7", image=[input_files["image"][0]])],
           steps=3)
    save_model(tmp_path / "run", assembled, stage="instruct")
    export_run(tmp_path / "run", "llava-hf", tmp_path / "out", host=mm_host)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["vision_feature_select_strategy"], config["projector_hidden_act"]) == ("full", "linear")
    assert config["vision_config"]["num_hidden_layers"] == 1  # cut after layer 1 of 2 (feature_layer -2)

    mm = load(tmp_path / "run", host=mm_host)
    image = input_files["image"][1]
    ids, logits = _mmkit_logits(mm, QUESTION, {"image": [str(image)]})
    model = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
    processor = AutoProcessor.from_pretrained(str(tmp_path / "out"), backend="pil")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(image), text=prompt, return_tensors="pt", add_special_tokens=False)
    assert inputs["input_ids"][0].tolist() == ids  # 17 image tokens: 16 patches + CLS
    with torch.no_grad():
        hf = model(**inputs).logits[0].float()
    vocab = mm.assembled.first_new_token_id
    assert (hf[:, :vocab] - logits[:, :vocab]).abs().max().item() < TOL


def test_run_and_export_files_have_the_umask_mode(image_run, tmp_path, mm_host):
    """safetensors writes 0600 files; a run and its exports are read like any other output."""
    from mmkit.export import export_run
    from mmkit.atomic import default_mode

    export_run(image_run, "peft", tmp_path / "peft", host=mm_host)
    for root in (image_run / "model", tmp_path / "peft"):
        paths = [root, *root.rglob("*")]
        assert any(p.suffix == ".safetensors" for p in paths)
        wrong = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in paths
                 if stat.S_IMODE(p.stat().st_mode) != default_mode(directory=p.is_dir())}
        assert wrong == {}


# -- what a run trained with LoRA on a tied head, encoder LoRA or a library template exports ----------------------

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


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")  # peft: the LoRA is on the tied head
def test_merged_export_keeps_the_lora_of_a_tied_output_head(mm_host, tied_llm, tmp_path):
    """LoRA on ``lm_head`` of a tied-embedding LLM: the adapted head is no longer the input
    embedding. The merged and llava-hf exports must keep the head's delta (untie), not re-tie it to
    the embeddings and drop it: their logits must be mmkit's."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

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
    assert merged.config.tie_word_embeddings is False
    export_run(run, "llava-hf", tmp_path / "llava", host=mm_host)
    llava = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "llava")).eval()
    for name, exported in (("merged", merged), ("llava-hf", llava)):
        with torch.no_grad():
            got = exported(input_ids=torch.tensor([ids])).logits[0].float()
        diff = (got[:, :vocab] - logits[:, :vocab]).abs().max().item()
        assert diff < TOL, f"{name} export differs from mmkit by {diff:.3g} (the lm_head LoRA delta was lost)"


def test_exports_keep_the_trained_encoder_lora(mm_host, tiny_llm, tmp_path):
    """encoder_lora on a pretrained encoder: the export names the pretrained weights for the
    encoder, so its trained LoRA weights must be in the export too, with what it takes to re-inject
    them: the encoder rebuilt from the export alone computes what the run's encoder computes."""
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from mmkit_plugin_image.encoder import _processor_class
    from mmkit_plugin_image.plugin import TINY_CLIP

    from mmkit.export import export_run
    from mmkit.modeling.assemble import ModalityChoice, ModelConfig, assemble
    from mmkit.modeling.components import build_encoder
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
    ours = assembled.model.encoders["image"].eval()
    x = torch.randn(2, *ours.input_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ours(x)

    for fmt in ("peft", "merged"):
        out = tmp_path / fmt
        export_run(run, fmt, out, host=mm_host)
        exported = [t for f in out.rglob("*.safetensors") for t in load_file(str(f)).values()]
        lost = [n for n, v in trained.items()
                if not any(t.shape == v.shape and torch.equal(t.float(), v.float()) for t in exported)]
        assert not lost, f"{fmt} export lost {len(lost)} trained encoder LoRA weights, e.g. {lost[:2]}"
        assert "encoder_lora.safetensors" in (out / "README.md").read_text()

        # rebuild the encoder from the export alone: pretrained weights, then the LoRA the index describes
        entry = json.loads((out / "mmkit_export.json").read_text())["modalities"]["image"]
        settings = entry["encoder_lora"]
        rebuilt = build_encoder(mm_host, mm_host.modality("image"), encoder_name=entry["encoder"],
                                pretrained=entry["encoder_weights"], options=entry["encoder_options"]).eval()
        with torch.no_grad():
            assert (rebuilt(x) - expected).abs().max().item() > 1e-2  # the trained LoRA changes the features
        inject_adapter_in_model(LoraConfig(r=settings["r"], lora_alpha=settings["lora_alpha"],
                                           lora_dropout=settings["lora_dropout"],
                                           target_modules=settings["target_modules"]),
                                rebuilt, adapter_name=settings["adapter_name"])
        weights = {k.partition(".")[2]: v for k, v in load_file(str(out / settings["weights"])).items()
                   if k.startswith("image.")}
        missing, unexpected = rebuilt.load_state_dict(weights, strict=False)
        assert unexpected == [] and not [k for k in missing if ".lora_" in k]  # every LoRA weight, nothing else
        with torch.no_grad():
            assert (rebuilt.eval()(x) - expected).abs().max().item() < TOL


def test_exported_tokenizers_render_the_runs_chat_template(mm_host, tiny_llm, tmp_path):
    """A run trained with a library template (--template vicuna_v1) on a tokenizer whose own chat
    template is another one: the model card says to prompt the merged LLM with
    ``tokenizer.apply_chat_template``, so the exported tokenizers must render the run's template
    (token for token what mmkit feeds the model, outer whitespace trimmed as mmkit does), not the
    base tokenizer's."""
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
    conversations = [[Turn("user", "hello world what about this one")],
                     [Turn("user", " hello world \n"), Turn("assistant", " yes "), Turn("user", "what about this one")]]

    export_run(run, "merged", tmp_path / "merged", host=mm_host)
    export_run(run, "peft", tmp_path / "peft", host=mm_host)
    for folder in (tmp_path / "merged" / "llm", tmp_path / "peft" / "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        for turns in conversations:
            expected = mm.prompts.encode_prompt(turns).input_ids
            prompt = tokenizer.apply_chat_template([{"role": t.role, "content": t.text} for t in turns],
                                                   tokenize=False, add_generation_prompt=True)
            got = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            assert got == expected, (f"{folder.relative_to(tmp_path)} renders {tokenizer.decode(got)!r}; the run was "
                                     f"trained on {mm.tokenizer.decode(expected)!r}")
        card = (folder.parent / "README.md").read_text()
        assert "template 'vicuna_v1'" in card and "Warning" not in card


# Llama-3.2's way: today's date through strftime_now unless date_string is passed
DATE_TEMPLATE = (
    "{%- if not date_string is defined -%}{%- if strftime_now is defined -%}{%- set date_string = "
    "strftime_now('%d %b %Y') -%}{%- else -%}{%- set date_string = '26 Jul 2024' -%}{%- endif -%}{%- endif -%}"
    "Today Date: {{ date_string }}\n{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}")


def test_exported_template_writes_the_date_mmkit_trained_with(mm_host, assemble_model):
    """mmkit renders a date-reading template with one fixed date on every day; the exported
    tokenizer's template must write that date too (not today's), unless the caller passes one."""
    import attrs
    from transformers.utils.chat_template_utils import render_jinja_template

    from mmkit.export.template import run_tokenizer
    from mmkit.inference import LoadedModel
    from mmkit.prompt import TEMPLATE_DATE, PromptBuilder, fixed_date_prelude

    assembled = assemble_model(("image",))
    prompts = PromptBuilder(assembled.tokenizer, assembled.prompts.markers, assembled.prompts.tokens_per_input,
                            template=DATE_TEMPLATE, max_length=256)
    mm = LoadedModel(attrs.evolve(assembled, prompts=prompts), mm_host)
    tokenizer, notes = run_tokenizer(mm)
    turns = [Turn("user", " what day is it ")]
    text = tokenizer.apply_chat_template([{"role": "user", "content": turns[0].text}], tokenize=False,
                                         add_generation_prompt=True)
    assert TEMPLATE_DATE.strftime("%d %b %Y") in text
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == prompts.encode_prompt(turns).input_ids
    assert not [n for n in notes if n.startswith("Warning")]
    own = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, date_string="1 Jan 2030")
    assert "Today Date: 1 Jan 2030" in own
    # a template that formats the date itself gets the same fixed date from the prelude's strftime_now
    fmt = "%Y-%m-%d %A %B %j (100%%)"
    rendered = render_jinja_template(conversations=[[{"role": "user", "content": "x"}]],
                                     chat_template=fixed_date_prelude() + f"{{{{ strftime_now({fmt!r}) }}}}")[0][0]
    assert rendered == TEMPLATE_DATE.strftime(fmt)

"""Assembling a multimodal model on real ``from_pretrained`` LLMs of three architectures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer

from mmkit.data.batching import Collator, SampleDataset, collate_fns, make_preprocessor
from mmkit.records import Sample, Turn
from mmkit.default_plugins.lora_targets import TARGETS
from mmkit.errors import ConfigError, DataError
from mmkit.modeling.assemble import trainable_parameters
from mmkit.modeling.lora import routes_for_rows
from mmkit.prompt import IGNORE_INDEX
from mmkit.specs import resolve

ARCHITECTURES = ["llama", "qwen2", "gpt_neox"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_mixed_batch_trains_on_each_architecture(assemble_model, kit, architecture):
    assembled = assemble_model(("image", "pointcloud"), architecture=architecture)
    model = assembled.model
    assert model.llm.config.model_type == architecture
    model.train()
    trainable_parameters(model, "instruct")
    mixed = kit.mixed()
    batch = kit.batch(assembled, mixed)
    assert routes_for_rows(batch.modalities, model.lora.adapters) == ["image", "pointcloud", "image", "text"]
    assert batch.inputs["image"].shape[0] == 2 and batch.inputs["pointcloud"].points.shape[0] == 2
    out = kit.run(model, batch)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    # logits only where a next token is supervised (mmkit.modeling.loss)
    supervised = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    assert out.logits.shape == (supervised, model.llm.get_output_embeddings().weight.shape[0])
    out.loss.backward()
    for modality in ("image", "pointcloud"):
        grads = [p.grad for p in model.projectors[modality].parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # each kind of row also works on its own, text-only included
    for sample in mixed:
        single = kit.run(model, kit.batch(assembled, [sample]))
        assert torch.isfinite(single.loss)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_default_lora_targets_come_from_the_plugin_hook(assemble_model, architecture):
    assembled = assemble_model(("image",), architecture=architecture)
    expected = TARGETS[architecture]
    assert assembled.config.lora.targets == tuple(expected)
    adapted = {name.rsplit(".", 1)[-1] for name, module in assembled.model.llm.named_modules()
               if isinstance(module, LoraLayer)}
    assert adapted == set(expected)
    if architecture == "gpt_neox":
        assert "query_key_value" in adapted and "q_proj" not in adapted


def test_explicit_lora_targets_win(mm_host, tiny_llm):
    from mmkit.modeling.assemble import ModalityChoice, ModelConfig, assemble
    from mmkit.modeling.lora import LoraSettings

    cfg = ModelConfig(llm=str(tiny_llm("llama")), modalities=(ModalityChoice("image"),),
                      lora=LoraSettings(r=2, targets=("q_proj", "v_proj")))
    assembled = assemble(cfg, mm_host)
    adapted = {n.rsplit(".", 1)[-1] for n, m in assembled.model.llm.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == {"q_proj", "v_proj"}


def test_encoders_get_the_plugins_tiny_configs_and_explicit_options_win(assemble_model, mm_host, tiny_llm):
    from mmkit.modeling.assemble import ModalityChoice, ModelConfig, assemble

    assembled = assemble_model(("image", "pointcloud"))
    for name in ("image", "pointcloud"):
        spec = mm_host.modality(name)
        # the random-init seed (mmkit passes the run's; 0 by default) is recorded with the options
        expected = {**mm_host.encoder(spec.encoder).tiny, **spec.demo.encoder_options, "seed": 0}
        assert assembled.components[name]["encoder_options"] == expected
        assert assembled.components[name]["encoder_pretrained"] is None
        encoder = assembled.model.encoders[name]
        assert assembled.components[name]["tokens_per_input"] == encoder.num_tokens
        assert not any(p.requires_grad for p in encoder.parameters())
    cfg = ModelConfig(llm=str(tiny_llm("llama")), lora=None, modalities=(
        ModalityChoice("image", encoder_options={"hidden_size": 16, "intermediate_size": 32}),
        ModalityChoice("pointcloud", encoder_options={"output_dim": 24}, projector="linear")))
    small = assemble(cfg, mm_host)
    assert small.model.encoders["image"].output_dim == 16
    assert small.model.encoders["pointcloud"].output_dim == 24
    assert small.model.projectors["pointcloud"].proj.in_features == 24
    assert small.model.lora is None


def test_embed_fills_exactly_the_placeholder_slots(assemble_model, kit):
    assembled = assemble_model(("image", "pointcloud"))
    model = assembled.model.eval()
    batch = kit.batch(assembled, kit.mixed())
    ids, inputs = batch.input_ids, batch.inputs
    with torch.no_grad():
        embeds = model.embed(ids, inputs)
        projected = {m: model.encode(m, inputs[m]) for m in inputs}
        base = model.llm.get_input_embeddings()
    assert embeds.shape == (*ids.shape, model.hidden_size)
    first_new = assembled.first_new_token_id
    assert base.weight.shape[0] == first_new  # the LLM's own table is not resized
    slots = torch.zeros_like(ids, dtype=torch.bool)
    for modality, ph in model.placeholder_ids.items():
        assert assembled.tokenizer.convert_tokens_to_ids(assembled.prompts.markers[modality].placeholder) == ph
        mask = ids == ph
        slots |= mask
        # the inputs are stacked in row order, so row r's slots hold row r's inputs' features
        assert torch.equal(embeds[mask], projected[modality].reshape(-1, model.hidden_size))
    # row 2 holds the second image: its slots carry exactly that image's features
    row2 = embeds[2][ids[2] == model.placeholder_ids["image"]]
    assert torch.equal(row2, projected["image"][1])
    # every other token: the LLM's embedding, or the trainable marker table for mmkit's markers
    others = ~slots
    text = others & (ids < first_new)
    with torch.no_grad():
        assert torch.equal(embeds[text], base(ids[text]))
        markers = others & (ids >= first_new)
        assert markers.any()
        assert torch.equal(embeds[markers], model.embeddings.new_tokens[ids[markers] - first_new])


def test_slot_count_mismatch_is_a_data_error(assemble_model, kit):
    assembled = assemble_model(("image", "pointcloud"))
    model = assembled.model.eval()
    batch = kit.batch(assembled, kit.mixed()[:1])  # one image: 16 slots
    two = torch.cat([batch.inputs["image"]] * 2)
    with pytest.raises(DataError, match=r"16 image slots for 2 inputs"):
        model.embed(batch.input_ids, {"image": two})
    with pytest.raises(DataError, match=r"16 image slots but no image input"):
        model.embed(batch.input_ids, {})


def test_files_through_dataset_and_collator(assemble_model, kit, mm_host, input_files):
    """The real path: files -> plugin loader -> encoder preprocess -> prompt builder -> forward."""
    assembled = assemble_model(("image", "pointcloud"))
    model = assembled.model
    preprocess = {m: make_preprocessor(resolve(mm_host.modality(m).load), model.encoders[m].preprocess)
                  for m in ("image", "pointcloud")}
    samples = [kit.sample("<image> <image> What is shown here ?", "7",
                           image=[str(p) for p in input_files["image"][:2]]),
               kit.sample("<pointcloud> Which shape is it ?", "a cube", pointcloud=[str(input_files["pointcloud"][0])]),
               kit.sample("hello world", "yes")]
    dataset = SampleDataset(samples, assembled.prompts, preprocess)
    batch = Collator(pad_id=assembled.tokenizer.pad_token_id, collate=collate_fns(model.encoders))(
        [dataset[i] for i in range(3)])
    assert batch.inputs["image"].shape == (2, *model.encoders["image"].input_shape)
    cfg = model.encoders["pointcloud"].cfg  # points and their grouping (int64), each stacked
    assert batch.inputs["pointcloud"].points.shape == (1, cfg.num_points, cfg.in_channels)
    assert batch.inputs["pointcloud"].centres.dtype == torch.long
    assert batch.modalities == (("image",), ("pointcloud",), ())
    assert routes_for_rows(batch.modalities, model.lora.adapters) == ["image", "pointcloud", "text"]
    model.train()
    assert torch.isfinite(kit.run(model, batch).loss)
    # a sample of a modality the model lacks is refused by name
    audio = Sample(id="a", turns=(Turn("user", "hello"), Turn("assistant", "yes")), inputs={"audio_example": ("x",)},
                   source="f.jsonl", index=3)
    with pytest.raises(DataError, match=r"f.jsonl record 3: .*no audio_example modality"):
        SampleDataset([audio], assembled.prompts, preprocess).encode(
            audio, assembled.prompts.encode_prompt(audio.turns))


def test_trainable_parameter_groups_per_stage(assemble_model):
    assembled = assemble_model(("image", "pointcloud"))
    model = assembled.model
    align = trainable_parameters(model, "align")
    assert set(align) == {"projectors", "embeddings"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projectors.") or n == "embeddings.new_tokens" for n in trainable)
    instruct = trainable_parameters(model, "instruct")
    assert set(instruct) == {"projectors", "embeddings", "lora"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    assert lora and {n for n in lora if ".text." in n} and {n for n in lora if ".pointcloud." in n}
    assert not any(n.startswith("encoders.") for n in trainable)
    assert not any("lora_" not in n and n.startswith("llm.") for n in trainable)
    with pytest.raises(ConfigError, match="unknown stage"):
        trainable_parameters(model, "pretrain")


def test_markers_are_atomic_tokens_with_a_trainable_table(assemble_model):
    assembled = assemble_model(("image", "pointcloud"))
    tok = assembled.tokenizer
    markers = ["<image>", "<Img>", "</Img>", "<pointcloud>", "<Pcl>", "</Pcl>"]
    ids = tok.convert_tokens_to_ids(markers)
    assert sorted(ids) == list(range(assembled.first_new_token_id, assembled.first_new_token_id + len(markers)))
    text = "<Img><image><image></Img>What<pointcloud>"
    assert tok(text, add_special_tokens=False)["input_ids"] == tok.convert_tokens_to_ids(
        ["<Img>", "<image>", "<image>", "</Img>", "What", "<pointcloud>"])
    assert assembled.model.embeddings.new_tokens.shape == (len(markers), assembled.model.hidden_size)


def test_no_modality_is_a_config_error(mm_host, tiny_llm):
    from mmkit.modeling.assemble import ModelConfig, assemble

    with pytest.raises(ConfigError, match="at least one modality"):
        assemble(ModelConfig(llm=str(tiny_llm("llama")), modalities=()), mm_host)


def test_unloadable_llm_is_a_config_error(mm_host, tmp_path: Path):
    from mmkit.modeling.assemble import ModalityChoice, ModelConfig, assemble

    with pytest.raises(ConfigError, match="cannot load the LLM"):
        assemble(ModelConfig(llm=str(tmp_path / "nothing_here"), modalities=(ModalityChoice("image"),)), mm_host)

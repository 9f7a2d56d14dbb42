"""``mmkit train --dry-run``: LLaVA-1.5-7B's components sized from their published configurations
alone (Vicuna-7B v1.5 and CLIP ViT-L/14-336 config files, no weights), on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# lmsys/vicuna-7b-v1.5 config.json (LLaMA-2-7B architecture)
VICUNA_7B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pad_token_id": 0, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True, "vocab_size": 32000,
}
# openai/clip-vit-large-patch14-336 config.json (the fields that shape the model) and preprocessor_config.json
CLIP_L14_336 = {
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768, "logit_scale_init_value": 2.6592,
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                    "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408,
                    "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05},
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "num_attention_heads": 16,
                      "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu",
                      "layer_norm_eps": 1e-05, "num_channels": 3},
}
CLIP_L14_336_PREPROCESSOR = {
    "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 336,
}
PUBLISHED = {"llm": 6.74e9, "encoder": 304e6}  # LLaMA-2-7B / Vicuna-7B; CLIP ViT-L/14-336 vision tower


@pytest.fixture(scope="module")
def llava_configs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llava15_configs")
    llm, clip = root / "vicuna-7b-v1.5", root / "clip-vit-large-patch14-336"
    llm.mkdir()
    clip.mkdir()
    (llm / "config.json").write_text(json.dumps(VICUNA_7B))
    (clip / "config.json").write_text(json.dumps(CLIP_L14_336))
    (clip / "preprocessor_config.json").write_text(json.dumps(CLIP_L14_336_PREPROCESSOR))
    return {"llm": llm, "clip": clip}


def _config(configs: dict[str, Path], tmp_path: Path, **extra):
    from mmkit.training.config import resolve_config

    return resolve_config(None, {"llm": str(configs["llm"]), "modalities": "image", "precision": "bf16",
                                 "encoder_pretrained": {"image": str(configs["clip"])},
                                 "output_dir": str(tmp_path / "run"), **extra})


def test_llava15_7b_matches_the_published_sizes(llava_configs, mm_host, tmp_path: Path) -> None:
    from mmkit.training.dry_run import dry_run

    report = dry_run(_config(llava_configs, tmp_path, num_procs=8, stage="align"), mm_host)
    params = report["parameters"]
    assert set(params) == {"llm", "encoder.image", "projector.image"}
    llm, encoder, projector = params["llm"], params["encoder.image"], params["projector.image"]
    assert abs(llm["total"] / PUBLISHED["llm"] - 1) < 0.10
    # LLaVA's penultimate-layer features: the last of the 24 layers is dropped (~12.6M), still within 10%
    assert abs(encoder["total"] / PUBLISHED["encoder"] - 1) < 0.10
    assert encoder["trainable"] == 0
    # LLaVA-1.5's mlp2x_gelu projector: 1024 -> 4096 -> 4096, weights and biases
    assert projector["total"] == projector["trainable"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    # align: the projector and the marker-token rows are all that trains
    assert llm["trainable"] == llm["total"] - 6_738_415_616 and 0 < llm["trainable"] < 4096 * 10
    assert report["tokens_per_sample"]["per_input"] == {"image": 576}  # (336 / 14)^2 patches, CLS dropped
    memory = report["memory_per_gpu_gib"]
    assert set(memory) == {"0", "1", "2", "3"}
    frozen_gib = (llm["total"] - llm["trainable"] + encoder["total"]) * 2 / 2**30  # bf16
    assert frozen_gib < memory["0"] < frozen_gib + 1  # ~21M trainable x 20 bytes on top of the frozen weights
    assert memory["3"] < memory["2"] <= memory["1"] <= memory["0"]
    assert memory["3"] < frozen_gib / 8 + 1  # ZeRO-3 spreads the frozen weights over the 8 GPUs


def test_instruct_counts_lora_and_json_on_stdout(llava_configs, mm_host, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from mmkit_cli import train_cmd

    app = typer.Typer()
    app.callback()(lambda: None)  # a group, so the command is called as `train`
    train_cmd.register(app)
    result = CliRunner().invoke(app, ["train", "--dry-run", "--json", "--llm", str(llava_configs["llm"]),
                                      "--modalities", "image", "--precision", "bf16", "--lora-r", "128",
                                      "--template", "vicuna_v1",
                                      "--encoder-pretrained", f"image={llava_configs['clip']}",
                                      "--num-procs", "8", "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # one JSON object, nothing else
    assert {"parameters", "tokens_per_sample", "memory_per_gpu_gib"} <= set(report)
    llm = report["parameters"]["llm"]
    # LLaVA-1.5 LoRA (r=128) on every linear layer of the 32 blocks: per block 4 x (4096+4096) x 128 for
    # attention and 3 x (4096+11008) x 128 for the MLP, one adapter per modality + one for text-only samples
    per_adapter = 32 * 128 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    assert llm["trainable"] - (llm["total"] - 6_738_415_616 - 2 * per_adapter) == 2 * per_adapter
    assert 0.9 < report["parameters_all"]["total"] / (PUBLISHED["llm"] + PUBLISHED["encoder"]) < 1.1


def test_dry_run_needs_a_real_llm(mm_host, tmp_path: Path) -> None:
    from mmkit.errors import ConfigError
    from mmkit.training.config import resolve_config
    from mmkit.training.dry_run import dry_run

    with pytest.raises(ConfigError, match="--dry-run sizes a run of a real LLM"):
        dry_run(resolve_config(None, {"output_dir": str(tmp_path)}), mm_host)


def test_memory_formula_follows_deepspeeds_estimators() -> None:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from mmkit.training.dry_run import GIB, memory_per_gpu

    got = memory_per_gpu(frozen_llm=7_000_000_000, frozen_other=0, trainable=100_000_000, largest_layer=131_000_000,
                         num_gpus=4, precision="bf16")
    _, zero2 = estimate_zero2_model_states_mem_needs(total_params=100_000_000, num_gpus_per_node=4, cpu_offload=False)
    assert got["2"] == round((zero2 + 14e9) / GIB, 3)
    assert got["0"] == round((20 * 100e6 + 14e9) / GIB, 3)
    assert got["3"] < got["2"]
    q4 = memory_per_gpu(frozen_llm=7_000_000_000, frozen_other=0, trainable=100_000_000, largest_layer=0,
                        num_gpus=1, precision="bf16", quantize="4bit")
    assert q4["0"] == round((20 * 100e6 + 3.5e9) / GIB, 3)

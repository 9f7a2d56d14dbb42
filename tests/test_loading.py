"""Loading at real sizes: the weight dtype follows --precision, the attention kernel is chosen and
refused with a reason where it cannot run, k-bit quantization is refused where it cannot run, and
under ZeRO-3 the LLM loads straight into DeepSpeed partitions (``zero.Init``) with the checkpoint's
values."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmkit.errors import ConfigError
from mmkit.modeling import loading


def test_bf16_loads_llm_and_encoders_in_bf16_with_sdpa(assemble_model) -> None:
    import torch

    assembled = assemble_model(("image",), precision="bf16")
    model = assembled.model
    llm_dtypes = {p.dtype for n, p in model.llm.named_parameters() if "lora_" not in n}
    assert llm_dtypes == {torch.bfloat16}
    assert {p.dtype for p in model.encoders["image"].parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.encoders["image"].parameters())  # frozen
    # every trainable weight in the same dtype (ZeRO-3 partitions them together; DeepSpeed keeps fp32 masters)
    assert {p.dtype for p in model.projectors.parameters()} == {torch.bfloat16}
    assert model.embeddings.new_tokens.dtype == torch.bfloat16
    assert model.llm.config._attn_implementation == "sdpa"  # the best available on a CPU
    # the encoder identity (what checkpoints and the feature cache key on) does not depend on precision
    fp32 = assemble_model(("image",))
    assert fp32.components["image"]["encoder_identity"] == assembled.components["image"]["encoder_identity"]
    assert {p.dtype for n, p in fp32.model.llm.named_parameters()} == {torch.float32}


def test_explicit_attention_choice_is_used(assemble_model) -> None:
    assembled = assemble_model(("image",), attn_implementation="eager", lora=False)
    assert assembled.model.llm.config._attn_implementation == "eager"


def test_flash_attention_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="flash-attn package is not installed"):
        loading.attention_candidates("flash_attention_2", "bf16")
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(loading, "_cuda", lambda: False)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        loading.attention_candidates("flash_attention_2", "bf16")
    assert loading.attention_candidates(None, "bf16") == ["sdpa", "eager"]  # installed but no GPU: not picked
    monkeypatch.setattr(loading, "_cuda", lambda: True)
    assert loading.attention_candidates(None, "bf16")[0] == "flash_attention_2"
    assert loading.attention_candidates(None, "fp32")[0] == "sdpa"  # flash-attention has no fp32 kernels
    with pytest.raises(ConfigError, match="bf16 or fp16 only"):
        loading.attention_candidates("flash_attention_2", "fp32")


def test_quantize_refused_without_bitsandbytes_or_gpu(assemble_model, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = loading.importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name: None if name == "bitsandbytes" else real_find_spec(name))
    with pytest.raises(ConfigError, match=r"quantize 4bit: needs the bitsandbytes package"):
        assemble_model(("image",), quantize="4bit")
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name: object() if name == "bitsandbytes" else real_find_spec(name))
    monkeypatch.setattr(loading, "_cuda", lambda: False)
    with pytest.raises(ConfigError, match=r"quantize 8bit: bitsandbytes' k-bit training kernels need a CUDA GPU"):
        assemble_model(("image",), quantize="8bit")
    monkeypatch.setattr(loading, "_cuda", lambda: True)
    assert "ZeRO-3" in loading.quantize_problem("4bit", zero_stage=3)
    assert loading.quantize_problem("4bit", zero_stage=2) is None
    assert loading.quantize_problem(None) is None


def test_quantize_refused_from_the_command_line_on_this_machine(tmp_path: Path) -> None:
    """Through ``mmkit train``: refused before training, naming the reason (no GPU / no bitsandbytes here)."""
    from drill import child_env, train_command, write_tiny_run

    run = write_tiny_run(tmp_path / "tiny", samples=4)
    cmd = train_command(run, tmp_path / "out", max_steps=1, quantize="4bit")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env())
    text = (result.stdout + result.stderr).replace("\n", " ")
    assert result.returncode != 0
    assert "quantize 4bit:" in text and ("bitsandbytes" in text or "CUDA GPU" in text), text[-2000:]
    assert "Traceback" not in text


def test_encoder_checkpointing_needs_a_trained_encoder(assemble_model) -> None:
    with pytest.raises(ConfigError, match="encoder_gradient_checkpointing: the encoders are frozen"):
        assemble_model(("image",), encoder_gradient_checkpointing=True)
    assembled = assemble_model(("image",), encoder_lora=True, encoder_gradient_checkpointing=True)
    clip = assembled.model.encoders["image"].model
    assert any(getattr(m, "gradient_checkpointing", False) for m in clip.modules())


ZERO3_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from mmkit.modeling.assemble import ModalityChoice, ModelConfig, assemble
    from mmkit.modeling.lora import LoraSettings
    from mmkit.plugins import get_host
    from mmkit.training.distributed import init_distributed
    from transformers import AutoModelForCausalLM

    init_distributed()
    llm_dir, clip_dir = sys.argv[1], sys.argv[2]
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from mmkit_plugin_image.encoder import _processor_class
    from mmkit_plugin_image.plugin import TINY_CLIP
    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).save_pretrained(clip_dir)  # a saved encoder, loaded by path
    _processor_class()(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(clip_dir)
    ds = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1, "zero_optimization": {"stage": 3},
          "bf16": {"enabled": True}}
    cfg = ModelConfig(llm=llm_dir, modalities=(ModalityChoice("image", encoder_pretrained=clip_dir),), precision="bf16",
                      lora=LoraSettings(r=2, alpha=4, dropout=0.0))
    assembled = assemble(cfg, get_host(), deepspeed_config=ds)
    from transformers.integrations import is_deepspeed_zero3_enabled
    llm = assembled.model.llm
    base = {n: p for n, p in llm.named_parameters() if "lora_" not in n}
    reference = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.bfloat16)
    ref = {n: p for n, p in reference.named_parameters()}
    import deepspeed
    with deepspeed.zero.GatheredParameters(list(base.values())):
        diff = max(float((p.float() - ref[n.replace("base_model.model.", "")].float()).abs().max())
                   for n, p in base.items() if n.replace("base_model.model.", "") in ref)
    print(json.dumps({
        "partitioned": all(hasattr(p, "ds_id") for p in base.values()),
        "empty_data": all(p.numel() == 0 for p in base.values()),
        "dtypes": sorted({str(p.ds_tensor.dtype) for p in base.values()}),
        "embed_shape": list(assembled.model.embeddings._base().weight.ds_shape),
        "hidden": assembled.model.hidden_size,
        "max_diff": diff,
        "zero3_still_enabled": is_deepspeed_zero3_enabled(),
        "new_tokens_finite": bool(assembled.model.embeddings.new_tokens.float().isfinite().all()),
        # the encoder is built whole: its identity hashes real weights (a reload must find the same)
        "encoder_partitioned": any(hasattr(p, "ds_id") for p in assembled.model.encoders["image"].parameters()),
        "encoder_identity": assembled.components["image"]["encoder_identity"]["weights_sha256"],
        "reference_identity": assemble(
            ModelConfig(llm=llm_dir, modalities=(ModalityChoice("image", encoder_pretrained=clip_dir),)),
            get_host()).components["image"]["encoder_identity"]["weights_sha256"],
    }))
""")


@pytest.mark.slow
def test_zero3_loads_the_llm_into_partitions(tiny_llm, tmp_path: Path) -> None:
    from drill import child_env

    llm_dir = tiny_llm("llama")
    script = tmp_path / "zero3_load.py"
    script.write_text(ZERO3_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(llm_dir), str(tmp_path / "clip")], capture_output=True,
                            text=True, timeout=300, env=child_env())
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["partitioned"] and out["empty_data"]  # built inside zero.Init: no full copy kept
    assert out["dtypes"] == ["torch.bfloat16"]
    assert out["embed_shape"][1] == out["hidden"] == 32
    assert out["max_diff"] == 0.0  # the partitions hold the checkpoint's values
    assert out["new_tokens_finite"]
    assert not out["zero3_still_enabled"]  # later loads (evaluation on rank 0) are ordinary ones
    assert not out["encoder_partitioned"] and out["encoder_identity"] == out["reference_identity"]

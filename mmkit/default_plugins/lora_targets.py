"""Default LoRA targets for common LLM architectures (asked last, so any plugin can override)."""

from mmkit import hookimpl

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")

# Attention and MLP projections: adapting the MLP too costs little and learns much faster on small
# models; LAMM adapts q/k/v/o only (pass --lora-targets to match it).
TARGETS = {
    **{arch: _ATTENTION + _MLP for arch in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
        "gemma3_text", "olmo", "olmo2", "granite", "smollm3", "cohere", "stablelm", "deepseek_v2")},
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "gptj": ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "falcon": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "bloom": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
}


@hookimpl(trylast=True)
def mmkit_lora_targets(model_type, module_names):
    if model_type in TARGETS:
        return list(TARGETS[model_type])
    # Unknown architecture: every linear layer but the output head (peft's "all-linear" rule).
    leaves = sorted({name.rsplit(".", 1)[-1] for name in module_names} - {"lm_head", "embed_out", "output"})
    return leaves or None

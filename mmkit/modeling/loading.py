"""How the base models are loaded at real sizes: weight dtype, attention kernel, k-bit quantization,
and ZeRO-3 partitioned loading.

- ``precision`` (fp32 / bf16 / fp16) is the dtype the LLM and the frozen encoders are loaded and
  kept in; DeepSpeed keeps fp32 master copies of the trainable weights under bf16 / fp16.
- ``attn_implementation``: eager, sdpa or flash_attention_2; ``None`` picks the best available
  (flash-attention only when its package is installed and a CUDA device runs bf16/fp16).
- ``quantize`` (4bit / 8bit): bitsandbytes weights with peft's k-bit preparation (QLoRA); refused
  where it cannot run (no CUDA, no bitsandbytes, ZeRO-3).
- Under ZeRO-3, :func:`zero3_loading` keeps transformers' ``HfDeepSpeedConfig`` alive while the
  LLM loads, so ``from_pretrained`` builds it inside ``deepspeed.zero.Init``: every process holds
  only its partition of the weights (rank 0 also reads the checkpoint, in its stored dtype).
"""

from __future__ import annotations

import contextlib
import os
import importlib.util
from collections.abc import Iterator, Sequence
from typing import Any

from mmkit.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
ATTENTION = ("eager", "sdpa", "flash_attention_2")
QUANTIZE = ("4bit", "8bit")


def torch_dtype(precision: str) -> Any:
    import torch

    try:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    except KeyError:
        raise ConfigError(f"precision {precision!r}: use {', '.join(PRECISIONS)}") from None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def flash_attention_available(precision: str) -> bool:
    """flash-attn 2 runs on CUDA in half precision only."""
    return precision in ("bf16", "fp16") and importlib.util.find_spec("flash_attn") is not None and _cuda()


def attention_candidates(requested: str | None, precision: str) -> list[str]:
    """The attention implementations to try, best first. An explicit choice is the only candidate
    (refused with the reason when it cannot run here)."""
    if requested is None:
        return (["flash_attention_2"] if flash_attention_available(precision) else []) + ["sdpa", "eager"]
    if requested not in ATTENTION:
        raise ConfigError(f"attn_implementation {requested!r}: use {', '.join(ATTENTION)} (or unset: the best available)")
    if requested == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("attn_implementation flash_attention_2: the flash-attn package is not installed "
                              "(pip install flash-attn), or use sdpa")
        if not _cuda():
            raise ConfigError("attn_implementation flash_attention_2 needs a CUDA GPU; on this machine use sdpa")
        if precision == "fp32":
            raise ConfigError("attn_implementation flash_attention_2 runs in bf16 or fp16 only: set precision "
                              "bf16 (or use sdpa)")
    return [requested]


def quantize_problem(quantize: str | None, *, zero_stage: int = 0) -> str | None:
    """Why ``quantize`` cannot run here (``None``: it can, or no quantization was asked for)."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE:
        return f"quantize {quantize!r}: use {' or '.join(QUANTIZE)} (or unset)"
    if importlib.util.find_spec("bitsandbytes") is None:
        return (f"quantize {quantize}: needs the bitsandbytes package (pip install bitsandbytes), which is "
                "not installed")
    if not _cuda():
        return (f"quantize {quantize}: bitsandbytes' k-bit training kernels need a CUDA GPU and this machine "
                "has none; train unquantized (precision bf16) instead")
    if zero_stage == 3:
        return (f"quantize {quantize} with ZeRO-3: k-bit weights cannot be partitioned by ZeRO-3; use "
                "zero_stage 0-2 (the quantized base is already small)")
    return None


def check_quantize(quantize: str | None, *, zero_stage: int = 0) -> None:
    problem = quantize_problem(quantize, zero_stage=zero_stage)
    if problem is not None:
        raise ConfigError(problem)


def quantization_config(quantize: str, precision: str) -> Any:
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":  # QLoRA's recipe: NF4 with double quantization, computing in the run's dtype
        compute = torch_dtype(precision if precision != "fp32" else "bf16")
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute)
    return BitsAndBytesConfig(load_in_8bit=True)


@contextlib.contextmanager
def zero3_loading(deepspeed_config: dict[str, Any] | None) -> Iterator[None]:
    """While open, transformers builds models inside ``deepspeed.zero.Init`` (partitioned as they
    are created) and loads checkpoints into the partitions. transformers holds the config through a
    weak reference, so it is kept alive here; it is unset on exit, so that later single-process
    loads (evaluation on rank 0) are ordinary ones."""
    if not deepspeed_config or deepspeed_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(deepspeed_config)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep_alive


# -- ZeRO-3 partitioned parameters --------------------------------------------------------------
def full_shape(param: Any) -> tuple[int, ...]:
    """A parameter's shape, also when ZeRO-3 has partitioned it (its data is then empty)."""
    return tuple(getattr(param, "ds_shape", param.shape))


@contextlib.contextmanager
def gathered(params: Sequence[Any]) -> Iterator[None]:
    """The full values of (possibly ZeRO-3 partitioned) parameters, for reading."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def zero3_settings(llm: str | None, max_live_parameters: int) -> dict[str, Any]:
    """ZeRO-3 bucket sizes from the LLM's hidden size, as the Hugging Face Trainer's ``auto`` values
    (reduce bucket hidden^2, prefetch 0.9 hidden^2, parameters under 10 x hidden stay whole), instead of
    DeepSpeed's fixed 5e8 / 5e7 / 1e5 meant for large GPUs; and the gathered-parameter bound."""
    out: dict[str, Any] = {"stage3_max_live_parameters": int(max_live_parameters),
                           "stage3_max_reuse_distance": int(max_live_parameters)}
    hidden = None
    if llm is not None:
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(llm)
            hidden = getattr(config, "hidden_size", None) or getattr(config.get_text_config(), "hidden_size", None)
        except (OSError, ValueError):
            hidden = None  # the LLM is reported unreadable when it loads
    if hidden:
        out.update(reduce_bucket_size=hidden * hidden, stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                   stage3_param_persistence_threshold=10 * hidden)
    return out


def device() -> "torch.device":  # noqa: F821 - torch imported lazily
    """This process's compute device: its local GPU under a launcher, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")

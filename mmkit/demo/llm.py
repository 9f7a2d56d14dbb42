"""A tiny LLaMA-architecture LM and a word-level tokenizer, built offline for the embedded demo and
for tests. Both are saved with ``save_pretrained`` and then loaded back through the same
``from_pretrained`` path a real model takes."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmkit.templates import TEMPLATES

#: The demo speaks Phi-3's chat format (a real template; its role and end-of-turn markers are tokens here).
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIALS = ("<unk>", "<pad>", "<s>", "</s>", *CHAT_TOKENS)
_WORDS = re.compile(r"\w+|[^\w\s]")


def build_tokenizer(corpus: Iterable[str]):
    """A word-level tokenizer over ``corpus`` with the ``phi3`` chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in corpus for w in _WORDS.findall(text)})
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS)})
    tokenizer.chat_template = TEMPLATES["phi3"].source
    return tokenizer


def build_general_tokenizer():
    """GPT-2's byte-level BPE (50,257 tokens; shipped in the wheel, see ``GPT2_TOKENIZER_LICENSE``)
    with the ``phi3`` chat template: any text tokenizes without unknown tokens."""
    import gzip

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = gzip.decompress((Path(__file__).with_name("gpt2_tokenizer.json.gz")).read_bytes()).decode("utf-8")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(data), bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": list(CHAT_TOKENS)})
    tokenizer.chat_template = TEMPLATES["phi3"].source
    return tokenizer


#: ``--llm tiny``: a small random-init LLaMA with the general tokenizer, built offline on first use.
TINY_LLM = "tiny"
_TINY_VERSION = 1  # bump when the recipe below changes: a new cache folder, never a changed one


def tiny_llm_path(cache_dir: str | Path | None = None) -> Path:
    """The ``--llm tiny`` model folder, built (seeded, so always the same weights) on first use into
    mmkit's cache folder (:func:`mmkit.cache.cache_root`) and moved into place whole."""
    import os
    import shutil
    import tempfile

    from mmkit.cache import cache_root

    root = Path(cache_dir).expanduser() if cache_dir else cache_root()
    target = root / f"tiny-llm-v{_TINY_VERSION}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-llm-", dir=root))
    try:
        build_tiny_llm(tmp, (), tokenizer=build_general_tokenizer(), max_positions=2048, seed=0)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: use its (identical) copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_llm(name_or_path: str) -> str:
    """``tiny`` -> the folder of :func:`tiny_llm_path`; any other name is returned unchanged."""
    return str(tiny_llm_path()) if name_or_path == TINY_LLM else name_or_path


def build_tiny_llm(out_dir: Path, corpus: Iterable[str], *, architecture: str = "llama", hidden_size: int = 64,
                   num_layers: int = 2, num_heads: int = 4, init_std: float = 0.25, seed: int = 0,
                   tokenizer: Any = None, max_positions: int = 512) -> Path:
    """Write a random-init causal LM + tokenizer to ``out_dir`` and return it.

    ``architecture``: ``llama`` (the demo), ``qwen2`` or ``gpt_neox`` (tests of other families).
    ``tokenizer``: the demo's word-level one over ``corpus`` unless given.
    ``init_std`` is larger than HF's 0.02: an untrained model with 0.02 weights can only produce
    near-uniform logits, and LoRA alone cannot lift a 64-wide output head out of that regime
    (re-drawing only the head learned about half as fast in our trials).
    """
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, Qwen2Config
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a one-shard save bar is noise at the start of the demo's output
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(corpus)
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, intermediate_size=hidden_size * 3, max_position_embeddings=max_positions,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                  initializer_range=init_std)
    if architecture == "llama":
        config = LlamaConfig(num_key_value_heads=max(1, num_heads // 2), **common)
    elif architecture == "qwen2":
        config = Qwen2Config(num_key_value_heads=max(1, num_heads // 2), **common)
    elif architecture == "gpt_neox":
        config = GPTNeoXConfig(**common)
    else:
        raise ValueError(f"unknown demo architecture {architecture!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir

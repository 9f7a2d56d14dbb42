"""The training loss at supervised positions only (``mmkit.modeling.loss``): the same loss and gradients
as transformers' full-logit loss, on several architectures (including one that soft-caps its logits and
one whose forward bypasses its output module), with the output layer run on the supervised rows only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmkit.modeling.attention import packed_attention_mask
from mmkit.modeling.loss import next_token_targets, output_rows, supervised_forward
from mmkit.prompt import IGNORE_INDEX

VOCAB, HIDDEN = 97, 32


def _model(architecture: str) -> nn.Module:
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64)
    configs = {
        "llama": lambda: tf.LlamaConfig(num_key_value_heads=2, **common),
        "qwen2": lambda: tf.Qwen2Config(num_key_value_heads=2, **common),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**common),  # output module named embed_out
        # soft-caps its logits after the output module: must still apply to the picked rows
        "gemma2": lambda: tf.Gemma2Config(num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0,
                                          attn_implementation="eager", **common),
    }
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(configs[architecture]()).eval()


def _batch(rows: int = 3, length: int = 9, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded rows of different lengths, each supervised on its last few tokens."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(rows, length, HIDDEN, generator=g)
    mask = torch.zeros(rows, length, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE_INDEX)
    for r in range(rows):
        n = length - r * 2
        mask[r, :n] = 1
        labels[r, n - 2 - r % 2:n] = torch.randint(0, VOCAB, (2 + r % 2,), generator=g)
    return embeds, mask, labels


def _reference(llm: nn.Module, embeds, mask, labels, position_ids=None):
    e = embeds.clone().requires_grad_(True)
    out = llm(inputs_embeds=e, attention_mask=mask, position_ids=position_ids, labels=labels, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), e.grad


def _ours(llm: nn.Module, embeds, mask, labels, position_ids=None):
    e = embeds.clone().requires_grad_(True)
    out = supervised_forward(llm, next_token_targets(labels), inputs_embeds=e, attention_mask=mask, position_ids=position_ids,
                             use_cache=False)
    out.loss.backward()
    return out, e.grad


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt_neox", "gemma2"])
def test_same_loss_and_gradients_as_the_full_logit_loss(architecture):
    llm = _model(architecture)
    embeds, mask, labels = _batch()
    seen = []
    handle = llm.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape))
    try:
        ref_loss, ref_grad = _reference(llm, embeds, mask, labels)
        seen.clear()
        out, grad = _ours(llm, embeds, mask, labels)
    finally:
        handle.remove()
    supervised = int((next_token_targets(labels) != IGNORE_INDEX).sum())
    assert seen == [torch.Size([1, supervised, HIDDEN])]  # the output layer ran on those rows only
    assert out.logits.shape == (supervised, VOCAB)
    torch.testing.assert_close(out.loss.detach(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    if architecture == "gemma2":  # the soft cap was applied to the picked rows
        assert float(out.logits.detach().abs().max()) <= 3.0


def test_packed_rows_with_a_block_mask_match_the_full_logit_loss():
    llm = _model("llama")
    embeds, _, labels = _batch(rows=1, length=12)
    labels[0, 3:5] = torch.tensor([5, 6])  # two samples in one row, each supervised on its end
    labels[0, 10:12] = torch.tensor([7, 8])
    segments = torch.tensor([[1] * 5 + [2] * 7])
    positions = torch.tensor([list(range(5)) + list(range(7))])
    mask = packed_attention_mask(segments, embeds.dtype, "sdpa")
    ref_loss, ref_grad = _reference(llm, embeds, mask, labels, positions)
    out, grad = _ours(llm, embeds, mask, labels, positions)
    torch.testing.assert_close(out.loss.detach(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


class _BypassingHead(nn.Module):
    """A causal LM whose forward computes logits from its tied embedding matrix directly, never calling
    the module ``get_output_embeddings`` returns (as some remote-code models do)."""

    def __init__(self):
        super().__init__()
        self.inner = _model("llama")
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, inputs_embeds, attention_mask, position_ids=None, use_cache=False):
        from transformers.modeling_outputs import CausalLMOutput

        hidden = self.inner.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids).last_hidden_state
        return CausalLMOutput(logits=nn.functional.linear(hidden, self.head.weight))


def test_a_model_that_bypasses_its_output_module_gets_the_same_loss_from_full_logits():
    model = _BypassingHead().eval()
    embeds, mask, labels = _batch()
    e = embeds.clone().requires_grad_(True)
    logits = model(inputs_embeds=e, attention_mask=mask).logits
    ref = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    out, _ = _ours(model, embeds, mask, labels)
    torch.testing.assert_close(out.loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert out.logits.shape == (int((labels[:, 1:] != IGNORE_INDEX).sum()), VOCAB)


def test_no_supervised_token_gives_nan_as_transformers_does():
    llm = _model("llama")
    embeds, mask, labels = _batch()
    labels[:] = IGNORE_INDEX
    ref = llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    out = supervised_forward(llm, next_token_targets(labels), inputs_embeds=embeds, attention_mask=mask)
    assert torch.isnan(ref) and torch.isnan(out.loss)


def test_the_model_does_not_run_the_last_position_and_keeps_a_lone_token(assemble_model, kit):
    assembled = assemble_model(("image",), mode="shared")
    model = assembled.model.eval()
    batch = kit.batch(assembled, [kit.sample("hello world", "yes"), kit.sample("<image> What is shown here ?", "7",
                                                                                image=["i"])])
    lengths = []
    handle = model.llm.model.register_forward_pre_hook(
        lambda _m, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**batch.model_kwargs())
            full = model(**{**batch.model_kwargs(), "labels": None})
            one = model(**{**batch.model_kwargs(), "input_ids": batch.input_ids[:, :1],
                           "attention_mask": batch.attention_mask[:, :1], "labels": batch.labels[:, :1],
                           "inputs": {}, "modalities": None})
    finally:
        handle.remove()
    width = batch.input_ids.shape[1]
    assert lengths == [width - 1, width, 1]  # a lone token has no last position to spare
    reference = nn.functional.cross_entropy(full.logits[:, :-1].reshape(-1, full.logits.shape[-1]),
                                            batch.labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, reference, rtol=1e-5, atol=1e-6)
    assert torch.isnan(one.loss)


def test_output_rows_leaves_other_calls_alone_and_removes_its_hook():
    llm = _model("llama")
    keep = torch.tensor([[True, False, True]])
    head = llm.get_output_embeddings()
    with output_rows(llm, keep) as state:
        unrelated = head(torch.randn(2, 5, HIDDEN))  # not [1, 3, hidden]: passed through
        assert unrelated.shape == (2, 5, VOCAB) and not state["applied"]
        picked = head(torch.randn(1, 3, HIDDEN))
        assert picked.shape == (1, 2, VOCAB) and state["applied"]
    assert head(torch.randn(1, 3, HIDDEN)).shape == (1, 3, VOCAB)

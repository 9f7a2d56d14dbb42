"""More checks of the supervised-positions loss (``mmkit.modeling.loss``): per-modality LoRA routed on
the output module itself, gradient checkpointing with bf16 and tied embeddings, and packed rows with
padding under an eager (additive) block mask. The reference is always the full-logit loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmkit.modeling.attention import packed_attention_mask
from mmkit.modeling.loss import next_token_targets, supervised_forward
from mmkit.prompt import IGNORE_INDEX

VOCAB, HIDDEN = 97, 32


def _full_logit_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' ForCausalLMLoss: position p scored against labels[p + 1], mean over labelled ones."""
    return nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                       labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def test_routed_lora_on_the_output_module_scores_each_row_with_its_own_adapter(mm_host, tiny_llm, randomize_lora,
                                                                                 kit):
    """``lora_targets`` may name the output module. Routed per-modality LoRA then adds each adapter's
    delta masked per batch row at that module too, so the loss must still be each row's own adapter's
    (the full-logit loss), not one row's route applied to every supervised position."""
    from mmkit.modeling.assemble import ModalityChoice, ModelConfig, assemble
    from mmkit.modeling.lora import LoraSettings, routes_for_rows

    torch.manual_seed(0)
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, mode="per_modality", targets=("q_proj", "v_proj", "lm_head"))
    assembled = assemble(ModelConfig(llm=str(tiny_llm("llama")), lora=settings,
                                     modalities=(ModalityChoice("image"), ModalityChoice("pointcloud"))), mm_host)
    model = assembled.model.eval()
    assert model.llm.get_output_embeddings() in model.lora.layers  # the output module is adapted
    randomize_lora(model)
    batch = kit.batch(assembled, kit.mixed(), seed=3)
    assert len(set(routes_for_rows(batch.modalities, model.lora.adapters))) > 1  # rows on different adapters
    with torch.no_grad():
        full = model(**{**batch.model_kwargs(), "labels": None}).logits
        out = model(**batch.model_kwargs())
    supervised = int((next_token_targets(batch.labels) != IGNORE_INDEX).sum())
    assert out.logits.shape == (supervised, full.shape[-1])
    torch.testing.assert_close(out.loss, _full_logit_loss(full, batch.labels), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, full[:, :-1][next_token_targets(batch.labels)[:, :-1] != IGNORE_INDEX],
                               rtol=1e-5, atol=1e-5)


def _llama(tie: bool) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                            tie_word_embeddings=tie)
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _loss_and_grads(llm: nn.Module, embeds: torch.Tensor, labels: torch.Tensor, ours: bool, **kwargs):
    llm.zero_grad(set_to_none=True)
    e = embeds.clone().requires_grad_(True)
    if ours:
        out = supervised_forward(llm, next_token_targets(labels), inputs_embeds=e, use_cache=False, **kwargs)
    else:
        out = llm(inputs_embeds=e, labels=labels, use_cache=False, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.float() for n, p in llm.named_parameters() if p.grad is not None}
    return out.loss.detach().float(), e.grad.float(), grads


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_gradient_checkpointing_in_bf16_runs_the_output_layer_once_with_the_same_loss_and_grads(tie):
    """Recomputation (non-reentrant, as mmkit enables it) must not run the output module again nor
    on other rows; a tied output weight gets the same gradient as with the full-logit loss."""
    llm = _llama(tie).to(torch.bfloat16).train()
    if hasattr(llm, "activation_checkpointing_enable"):  # as mmkit.modeling.assemble enables it
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert llm.is_gradient_checkpointing
    assert (llm.get_output_embeddings().weight is llm.get_input_embeddings().weight) == tie
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(3, 9, HIDDEN, generator=g).to(torch.bfloat16)
    mask = torch.zeros(3, 9, dtype=torch.long)
    labels = torch.full((3, 9), IGNORE_INDEX)
    for r in range(3):
        n = 9 - 2 * r
        mask[r, :n] = 1
        labels[r, n - 3:n] = torch.randint(0, VOCAB, (3,), generator=g)
    ref_loss, ref_grad, ref_params = _loss_and_grads(llm, embeds, labels, ours=False, attention_mask=mask)
    calls = []
    handle = llm.get_output_embeddings().register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape))
    try:
        loss, grad, params = _loss_and_grads(llm, embeds, labels, ours=True, attention_mask=mask)
    finally:
        handle.remove()
    supervised = int((next_token_targets(labels) != IGNORE_INDEX).sum())
    assert calls == [torch.Size([1, supervised, HIDDEN])]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grad, ref_grad, rtol=2e-2, atol=1e-3)
    assert params.keys() == ref_params.keys()
    for name in ref_params:
        torch.testing.assert_close(params[name], ref_params[name], rtol=2e-2, atol=1e-3, msg=name)


def test_packed_rows_with_padding_under_an_eager_additive_mask_match_the_full_logit_loss():
    """Two packed rows (the second ends in padding, segment 0) with eager's additive [B, 1, L, L]
    mask, which the loss cuts to [B, 1, L-1, L-1]."""
    import transformers as tf

    torch.manual_seed(0)
    llm = tf.AutoModelForCausalLM.from_config(
        tf.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64),
        attn_implementation="eager")
    embeds = torch.randn(2, 12, HIDDEN, generator=torch.Generator().manual_seed(3))
    segments = torch.tensor([[1] * 5 + [2] * 7, [1] * 4 + [2] * 5 + [0] * 3])
    positions = torch.tensor([list(range(5)) + list(range(7)), list(range(4)) + list(range(5)) + list(range(3))])
    labels = torch.full((2, 12), IGNORE_INDEX)
    labels[0, 3:5], labels[0, 10:12] = torch.tensor([5, 6]), torch.tensor([7, 8])
    labels[1, 2:4], labels[1, 7:9] = torch.tensor([1, 2]), torch.tensor([3, 4])
    mask = packed_attention_mask(segments, embeds.dtype, "eager")
    assert mask.dtype == embeds.dtype and mask.shape == (2, 1, 12, 12)
    ref = _loss_and_grads(llm, embeds, labels, ours=False, attention_mask=mask, position_ids=positions)
    ours = _loss_and_grads(llm, embeds, labels, ours=True, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-4, atol=1e-6)
    for name in ref[2]:
        torch.testing.assert_close(ours[2][name], ref[2][name], rtol=1e-4, atol=1e-6, msg=name)

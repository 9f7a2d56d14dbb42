"""Grouped and packed batches: packing keeps attention and labels inside each sample (the same
per-sample loss as alone), the samplers cover every sample once per epoch in the step geometry of
the global-batch sampler, grouped batches hold one modality group, and skipped records are counted
and failures named in the main process."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attrs

from mmkit.data.batch import Batch
from mmkit.data.batching import (Batches, Collator, SampleDataset, collate_fns, make_preprocessor,
                                 model_inputs)
from mmkit.data.packing import (
    GroupedBatchSampler,
    PackedBatchSampler,
    PackedView,
    PackingCollator,
    best_fit_decreasing,
    modality_group,
    sample_lengths,
)
from mmkit.modeling import model as model_module
from mmkit.modeling.attention import packed_attention_mask, packed_flash_kwargs
from mmkit.modeling.lora import routes_for_rows
from mmkit.errors import DataError
from mmkit.prompt import IGNORE_INDEX
from mmkit.specs import resolve


def random_input(encoder, gen):
    """Random values of the encoder's ``input_shape``; its blank item where it declares none."""
    return torch.randn(encoder.input_shape, generator=gen) if encoder.input_shape is not None else encoder.blank_item()


def items_for(assembled, samples, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in samples:
        enc = assembled.prompts.encode_sample(s)
        tensors = {m: [random_input(assembled.model.encoders[m], gen) for _ in p] for m, p in s.inputs.items()}
        out.append({"id": s.id, "input_ids": enc.input_ids, "labels": enc.labels, "inputs": tensors,
                    "modalities": s.modalities})
    return out


def per_sample_losses(logits, labels, segments):
    """Mean next-token loss of each sample (segment) of each row, from a forward with labels: logits at
    the supervised positions, in batch order (``mmkit.modeling.loss``)."""
    keep = labels[:, 1:] != IGNORE_INDEX
    assert logits.shape[0] == int(keep.sum())
    losses = F.cross_entropy(logits.float(), labels[:, 1:][keep], reduction="none")
    rows, segs = keep.nonzero()[:, 0], segments[:, 1:][keep]
    out = []
    for r in range(labels.shape[0]):
        for seg in range(1, int(segments[r].max()) + 1):
            sel = (rows == r) & (segs == seg)
            out.append(float(losses[sel].mean()))
    return out


@pytest.mark.parametrize("architecture, attention", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_packed_rows_give_each_sample_its_own_loss(assemble_model, kit, randomize_lora, architecture, attention):
    assembled = assemble_model(("image", "pointcloud"), architecture=architecture, mode="shared")
    model = assembled.model.eval()
    model.llm.set_attn_implementation(attention)
    randomize_lora(model)
    samples = [*kit.mixed(), kit.sample("<image> <image> What is shown here ?", "1 2 3", image=["a", "b"])]
    items = items_for(assembled, samples)
    pad = assembled.tokenizer.pad_token_id
    with torch.no_grad():
        collate = collate_fns(model.encoders)
        alone = [float(model(**model_inputs(Collator(pad_id=pad, collate=collate)([it]), "cpu")).loss) for it in items]
        rows = [0, 0, 1, 0, 1]  # two rows of mixed modalities, out of order
        batch = PackingCollator(pad_id=pad, collate=collate)([dict(it, row=r) for it, r in zip(items, rows)])
        out = model(**model_inputs(batch, "cpu"))
    packed = per_sample_losses(out.logits, batch.labels, batch.segment_ids)
    expected = [alone[i] for r in (0, 1) for i, row in enumerate(rows) if row == r]
    assert packed == pytest.approx(expected, abs=1e-5)
    # the same rows without the block-diagonal mask: later samples see earlier ones and change
    with torch.no_grad():
        leaky = model(**model_inputs(attrs.evolve(batch, segment_ids=None), "cpu"))
    assert per_sample_losses(leaky.logits, batch.labels, batch.segment_ids) != pytest.approx(expected, abs=1e-3)


def test_packed_batch_layout(assemble_model, kit):
    assembled = assemble_model(("image",), mode="shared")
    items = items_for(assembled, [kit.sample("hello world", "yes"), kit.sample("<image> What is shown here ?", "7",
                                                                                image=["i"])])
    batch = PackingCollator(pad_id=0)([dict(items[0], row=0), dict(items[1], row=0), dict(items[0], row=1)])
    n0, n1 = len(items[0]["input_ids"]), len(items[1]["input_ids"])
    assert batch.input_ids.shape == (2, n0 + n1)
    assert batch.position_ids[0].tolist() == list(range(n0)) + list(range(n1))
    assert batch.segment_ids[1].tolist() == [1] * n0 + [0] * n1
    assert batch.labels[0, n0] == IGNORE_INDEX  # the second sample's first token is no target
    assert batch.inputs["image"].shape[0] == 1 and batch.samples == 3
    assert batch.sample_rows == (0, 0, 1) and batch.modalities == ((), ("image",), ())
    assert batch.padding_fraction == pytest.approx(n1 / (2 * (n0 + n1)))
    mask = packed_attention_mask(batch.segment_ids, torch.float32, "sdpa")
    assert mask.dtype == torch.bool and not mask[0, 0, n0, n0 - 1] and mask[0, 0, n0 + 1, n0]
    additive = packed_attention_mask(batch.segment_ids, torch.bfloat16, "eager")
    assert additive.dtype == torch.bfloat16 and additive[0, 0, n0, n0 - 1] < -1e30
    assert packed_attention_mask(batch.segment_ids, torch.float16, "flash_attention_2") is None
    # the model routes each row from its samples' modalities: one adapter per modality refuses a mixed row
    assert routes_for_rows(batch.modalities, ["shared"], batch.sample_rows) == ["shared", "shared"]
    with pytest.raises(ValueError, match="mixes LoRA routes"):
        routes_for_rows(batch.modalities, ["image", "text"], batch.sample_rows)


def _lengths(n=400, seed=0):
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(5, 120, n)]
    groups = [("image", "pointcloud", "text")[i % 3] for i in range(n)]
    return lengths, groups


def test_grouped_batches_hold_one_group_and_similar_lengths():
    lengths, groups = _lengths()
    sampler = GroupedBatchSampler(lengths, groups, micro_batch_size=8, seed=1)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == sampler.steps_per_epoch
        assert Counter(i for b in batches for i in b) == Counter(range(len(lengths)))  # each sample once
        assert all(len({groups[i] for i in b}) == 1 for b in batches)
        assert all(len(b) <= 8 for b in batches)
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    assert spread < 25  # vs about 100 for random batches of 8 from 5..120
    # the biggest micro-batch comes first
    tokens = [len(b) * max(lengths[i] for i in b) for b in batches]
    assert tokens[0] == max(tokens)


@pytest.mark.parametrize("kind", ["grouped", "packed"])
def test_samplers_take_the_same_global_steps_on_any_number_of_processes(kind):
    lengths, groups = _lengths(301)

    def make(rank, world, accum):
        common = dict(micro_batch_size=4, grad_accum=accum, rank=rank, world_size=world, seed=3)
        if kind == "grouped":
            return GroupedBatchSampler(lengths, groups, **common)
        return PackedBatchSampler(lengths, groups, max_tokens=128, **common)

    one = make(0, 1, 4)
    two = [make(r, 2, 2) for r in range(2)]
    assert one.steps_per_epoch == two[0].steps_per_epoch == two[1].steps_per_epoch
    assert one.global_batch_size == two[0].global_batch_size
    single = list(one)
    pairs = [list(s) for s in two]
    for step in range(one.steps_per_epoch):
        together = single[step * 4:(step + 1) * 4]
        split = pairs[0][step * 2:(step + 1) * 2] + pairs[1][step * 2:(step + 1) * 2]
        assert together == split
    # resuming at a step yields the rest of the epoch
    one.set_epoch(0, start_step=2)
    assert list(one) == single[8:] and len(one) == len(single) - 8


def test_packed_rows_fit_cover_every_sample_once_and_keep_one_group():
    lengths, groups = _lengths(500)
    sampler = PackedBatchSampler(lengths, groups, max_tokens=160, micro_batch_size=3, seed=0)
    seen = Counter()
    for batch in sampler.micro_batches(0):
        rows: dict[int, list[int]] = {}
        for index, row in batch:
            rows.setdefault(row, []).append(index)
        assert len(rows) <= 3
        for members in rows.values():
            assert sum(lengths[i] for i in members) <= 160
            assert len({groups[i] for i in members}) == 1
        seen.update(i for i, _ in batch)
    assert seen == Counter(range(500))
    fill = sum(lengths) / (160 * len(sampler.rows(0)))
    assert fill > 0.95
    assert sampler.rows(0) != sampler.rows(1)  # reshuffled per epoch
    with pytest.raises(ValueError, match="longer than pack_max_tokens=100"):
        PackedBatchSampler(lengths, groups, max_tokens=100, micro_batch_size=2)


def test_best_fit_decreasing():
    lengths = [7, 5, 5, 4, 3, 3, 2, 1]
    bins = best_fit_decreasing(range(len(lengths)), lengths, 10)
    assert sorted(sum(lengths[i] for i in b) for b in bins) == [10, 10, 10]


def test_sample_lengths_and_groups(assemble_model, kit):
    assembled = assemble_model(("image", "pointcloud"))
    samples = kit.mixed()
    assert sample_lengths(assembled.prompts, samples) == [len(assembled.prompts.encode_sample(s).input_ids)
                                                          for s in samples]
    assert [modality_group(s) for s in samples] == ["image", "pointcloud", "image+pointcloud", "text"]


# -- train-time record failures -------------------------------------------------------------------
@pytest.fixture
def dataset_with_a_bad_record(assemble_model, kit, tmp_path, input_files, mm_host):
    assembled = assemble_model(("image",))
    model = assembled.model
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = [kit.sample("<image> What is shown here ?", str(i), image=[str(input_files["image"][i % 3])])
            for i in range(5)]
    bad = kit.sample("<image> What is shown here ?", "9", image=[str(broken)])
    import attrs

    bad = attrs.evolve(bad, id="bad-one", source="train.jsonl", index=3)
    samples = good[:3] + [bad] + good[3:]
    load = resolve(mm_host.modality("image").load)
    preprocess = {"image": make_preprocessor(load, model.encoders["image"].preprocess)}

    def build(skip: bool, workers: int = 0, batching: str = "pad"):
        dataset = SampleDataset(samples, assembled.prompts, preprocess, skip_bad_records=skip, defer_errors=True)
        if batching == "packed":
            sampler = PackedBatchSampler(sample_lengths(assembled.prompts, samples), ["image"] * 6, max_tokens=128,
                                         micro_batch_size=2)
            source, collator = PackedView(dataset), PackingCollator(pad_id=0, record_skipped=False)
        else:
            sampler = GroupedBatchSampler([1] * 6, ["image"] * 6, micro_batch_size=3)
            source, collator = dataset, Collator(pad_id=0, record_skipped=False)
        loader = torch.utils.data.DataLoader(source, batch_sampler=sampler, collate_fn=collator, num_workers=workers)
        return Batches(loader, collator), collator

    return build


@pytest.mark.parametrize("workers", [0, 1])
def test_a_record_that_fails_to_load_is_named_even_from_a_worker(dataset_with_a_bad_record, workers):
    batches, _ = dataset_with_a_bad_record(skip=False, workers=workers)
    with pytest.raises(DataError, match=r"train.jsonl record 3 \(id bad-one\): .*broken\.png: ") as err:
        list(batches)
    assert err.value.kind == "corrupt_file"


@pytest.mark.parametrize("batching", ["pad", "packed"])
def test_skipped_records_are_counted_once(dataset_with_a_bad_record, batching):
    from mmkit.training.recipe import _skipped_in_training

    batches, collator = dataset_with_a_bad_record(skip=True, batching=batching)
    for _epoch in range(2):
        total = sum(len(b.ids) for b in batches)
        assert total == 5
    assert len(collator.skipped) == 2 and _skipped_in_training(collator, world=1) == 1
    assert "broken.png" in collator.skipped[0].reason


def test_prefetching_batches_match_and_stop_cleanly(dataset_with_a_bad_record):
    batches, _ = dataset_with_a_bad_record(skip=True)
    plain = [b.ids for b in batches]
    batches.prefetch = 2
    assert [b.ids for b in batches] == plain
    for _ in batches:  # leaving early stops the reader thread
        break
    import threading

    assert not any(t.name == "mmkit-prefetch" and t.is_alive() for t in threading.enumerate())


def test_model_inputs_pass_packing_and_features_through():
    batch = Batch(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3),
                  ids=["a"], modalities=((),))
    assert set(model_inputs(batch, "cpu")) == {"input_ids", "attention_mask", "labels", "inputs", "modalities"}
    batch = attrs.evolve(batch, position_ids=torch.zeros(1, 3), segment_ids=torch.ones(1, 3), sample_rows=(0,),
                         features={"image": torch.zeros(1, 2, 2)})
    assert {"position_ids", "segment_ids", "features", "sample_rows"} <= set(model_inputs(batch, "cpu"))


# -- flash attention ---------------------------------------------------------------------------------
# The model hands transformers the samples' bounds (``cu_seq_lens_*``), so attention stays inside each
# sample in every packed row; transformers finds the samples itself only in a single row, and with
# several rows flash attention would attend across samples. flash-attn needs a GPU, so a CPU stand-in
# registered through transformers' attention interface plays its part: given the bounds it attends
# within each run of tokens (as ``flash_attn_varlen_func``), without them causally over each whole
# row (as the dense kernel transformers falls back to).
NAME = "flash_reference_cpu"


def flash_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``[B, H, L, D]`` in, ``[B, L, H, D]`` out, as transformers' attention functions."""
    rows, heads, length, dim = query.shape
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    flat = [x.transpose(1, 2).reshape(rows * length, x.shape[1], dim) for x in (query, key, value)]
    out = torch.empty_like(flat[0])
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        q, k, v = (x[start:end].transpose(0, 1) for x in flat)
        out[start:end] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                        enable_gqa=True).transpose(0, 1)
    return out.reshape(rows, length, heads, dim), None


@pytest.fixture
def flash_stand_in():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(NAME, flash_reference)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, flash_attention_mask)
    return NAME


def test_flash_bounds_cover_each_run_of_a_segment_row_by_row():
    kwargs = packed_flash_kwargs(torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0], [3, 3, 3, 3, 3, 3]]))
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 2, 5, 6, 10, 12, 18]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32 and kwargs["max_length_q"] == 6
    assert kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"] and kwargs["max_length_k"] == 6


def test_packed_rows_under_flash_attention_give_each_sample_its_own_loss(assemble_model, kit, randomize_lora,
                                                                          flash_stand_in, monkeypatch):
    assembled = assemble_model(("image", "pointcloud"), mode="shared")
    model = assembled.model.eval()
    randomize_lora(model)
    samples = [*kit.mixed(), kit.sample("<image> <image> What is shown here ?", "1 2 3", image=["a", "b"])]
    items = items_for(assembled, samples)
    pad = assembled.tokenizer.pad_token_id
    collate = collate_fns(model.encoders)
    rows = [0, 0, 1, 0, 1]  # two packed rows
    batch = PackingCollator(pad_id=pad, collate=collate)([dict(it, row=r) for it, r in zip(items, rows)])
    with torch.no_grad():
        alone = [float(model(**model_inputs(Collator(pad_id=pad, collate=collate)([it]), "cpu")).loss) for it in items]
        model.llm.config._attn_implementation = flash_stand_in
        try:
            packed = per_sample_losses(model(**model_inputs(batch, "cpu")).logits, batch.labels, batch.segment_ids)
            # without the bounds, flash attends across the samples of a row: the check can fail
            monkeypatch.setattr(model_module, "packed_flash_kwargs", lambda segment_ids: {})
            leaky = per_sample_losses(model(**model_inputs(batch, "cpu")).logits, batch.labels, batch.segment_ids)
        finally:
            model.llm.config._attn_implementation = "sdpa"
    expected = [alone[i] for r in (0, 1) for i, row in enumerate(rows) if row == r]
    assert packed == pytest.approx(expected, abs=1e-5)
    assert leaky != pytest.approx(expected, abs=1e-3)

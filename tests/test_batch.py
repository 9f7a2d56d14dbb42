"""The typed batch (mmkit.data.batch.Batch): the same fields from every collator, an empty stand-in,
moving that casts only floating-point leaves, and the model's encoder calls in bounded chunks."""

from __future__ import annotations

import attrs
import pytest
import torch

from mmkit.data.batch import Batch
from mmkit.data.batching import Collator, Skipped
from mmkit.data.packing import PackingCollator
from mmkit.modeling.features import RaggedFeatures
from mmkit.modeling.lora import routes_for_rows


def _item(name: str, n: int, modalities=()) -> dict:
    return {"id": name, "input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n)), "inputs": {},
            "modalities": tuple(modalities)}


def test_padded_and_packed_batches_have_the_same_fields():
    items = [_item("a", 3), _item("b", 5, ("x",)), _item("c", 2)]
    padded = Collator(pad_id=0)(items)
    packed = PackingCollator(pad_id=0)([dict(items[0], row=0), dict(items[1], row=1), dict(items[2], row=0)])
    for batch in (padded, packed):
        assert isinstance(batch, Batch) and not batch.is_empty and batch.samples == 3
        assert batch.num_tokens == 10 and batch.num_slots == batch.attention_mask.numel()
        assert batch.padding_fraction == pytest.approx(1 - 10 / batch.num_slots)
    assert padded.ids == ["a", "b", "c"] and padded.modalities == ((), ("x",), ())
    assert padded.sample_rows is None and padded.position_ids is None and padded.features is None
    assert packed.ids == ["a", "c", "b"] and packed.sample_rows == (0, 0, 1)
    # LoRA routes come from the rows' modalities, in the model (first modality / text, or the shared one)
    assert routes_for_rows(padded.modalities, ["x", "text"]) == ["text", "x", "text"]
    assert routes_for_rows(packed.modalities, ["x", "text"], packed.sample_rows) == ["text", "x"]
    assert routes_for_rows(packed.modalities, ["shared"], packed.sample_rows) == ["shared", "shared"]


def test_a_micro_batch_whose_records_all_failed_is_an_empty_stand_in():
    bad = [Skipped("f.jsonl record 1", "broken"), Skipped("f.jsonl record 2", "broken")]
    collator = Collator(pad_id=0)
    batch = collator(bad)
    assert batch.is_empty and batch.samples == 0 and batch.skipped == 2 and collator.skipped == bad
    assert Batch.empty().is_empty and Batch.empty().num_tokens == 0


def test_to_moves_and_casts_only_floating_leaves():
    graph_like = {"x": torch.randn(3, 2), "edge_index": torch.tensor([[0, 257], [1, 2]])}
    ragged = RaggedFeatures(torch.randn(3, 4), (1, 2), torch.tensor([False, False, True]))
    batch = Batch(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long),
                  torch.ones(2, 3, dtype=torch.long), ids=["a", "b"], modalities=(("g",), ("r",)),
                  inputs={"g": graph_like, "t": torch.randn(2, 5)}, features={"r": ragged},
                  position_ids=torch.zeros(2, 3, dtype=torch.long))
    moved = batch.to("cpu", torch.bfloat16)
    assert moved.inputs["g"]["x"].dtype == torch.bfloat16 and moved.inputs["t"].dtype == torch.bfloat16
    assert moved.inputs["g"]["edge_index"].dtype == torch.long and int(moved.inputs["g"]["edge_index"].max()) == 257
    assert moved.features["r"].values.dtype == torch.bfloat16 and moved.features["r"].counts == (1, 2)
    assert moved.features["r"].separators.dtype == torch.bool
    assert moved.input_ids.dtype == torch.long and moved.position_ids is not None
    assert batch.inputs["t"].dtype == torch.float32  # the original is left as it was
    kwargs = moved.model_kwargs()
    assert set(kwargs) == {"input_ids", "attention_mask", "labels", "inputs", "modalities", "features", "position_ids"}
    assert "segment_ids" not in kwargs and attrs.evolve(batch, sample_rows=(0, 1)).model_kwargs()["sample_rows"]


def test_large_tensor_batches_are_encoded_in_chunks_with_the_same_features(assemble_model, kit):
    assembled = assemble_model(("image",))
    model = assembled.model.eval()
    calls = []
    hook = model.encoders["image"].register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    x = torch.randn(7, *model.encoders["image"].input_shape)
    try:
        with torch.no_grad():
            whole = model.encode("image", x)
            model.encode_chunk = 3
            chunked = model.encode("image", x)
    finally:
        hook.remove()
    assert calls == [7, 3, 3, 1]
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)


def test_structured_batches_split_into_chunks_of_inputs_and_others_stay_whole():
    """A named tuple / dict whose every tensor holds one row per input (a grouped point cloud: points,
    centres, neighbour indices) is encoded in chunks like a tensor; a batch whose leaves disagree on
    the input count (inputs laid end to end with their counts) is encoded whole."""
    from typing import NamedTuple

    from mmkit.modeling.model import split_batch

    class Grouped(NamedTuple):
        points: torch.Tensor
        neighbours: tuple

    batch = Grouped(torch.randn(7, 5, 3), (torch.arange(7 * 4).reshape(7, 4), torch.zeros(7, 2, dtype=torch.long)))
    parts = split_batch(batch, 3)
    assert [type(p) for p in parts] == [Grouped] * 3 and [p.points.shape[0] for p in parts] == [3, 3, 1]
    assert torch.equal(torch.cat([p.neighbours[0] for p in parts]), batch.neighbours[0])
    assert [p["x"].shape[0] for p in split_batch({"x": torch.zeros(5, 2), "n": torch.ones(5)}, 4)] == [4, 1]
    assert split_batch(batch, 7) is None  # no larger than a chunk
    assert split_batch((torch.zeros(9, 3), torch.tensor([4, 5])), 1) is None  # frames end to end + counts
    assert split_batch([torch.zeros(4, 2), "not a tensor"], 1) is None

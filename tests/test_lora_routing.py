"""Per-modality LoRA routed by masks: which parameters a batch trains, the ZeRO-3 dummy pass, and
routing equivalence between batched and single-row passes."""

from __future__ import annotations

import pytest
import torch

from mmkit.records import Sample, Turn
from mmkit.inference import LoadedModel
from mmkit.modeling.assemble import trainable_parameters
from mmkit.modeling.lora import SHARED_ADAPTER, TEXT_ADAPTER, adapter_names_for, route_for_sample, routes_for_rows


@pytest.fixture(scope="module")
def rows(kit):
    mixed = kit.mixed()
    return {"mixed": mixed,
            "image": [mixed[0], kit.sample("<image> Which shape is it ?", "cone", image=["i"])],
            "text": [mixed[3], kit.sample("What is shown here ?", "hello")]}


def adapter_grads(model, adapter: str) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n and f".{adapter}." in n}


def is_zero(grads) -> bool:
    return all(g is None or not g.any() for g in grads)


def every_nonzero(grads) -> bool:
    grads = list(grads)
    return bool(grads) and all(g is not None and bool(g.any()) for g in grads)


@pytest.fixture
def routed(assemble_model, randomize_lora):
    assembled = assemble_model(("image", "pointcloud"), mode="per_modality")
    randomize_lora(assembled.model)
    trainable_parameters(assembled.model, "instruct")
    assembled.model.train()
    return assembled


@pytest.fixture
def backward(kit):
    def step(assembled, samples):
        model = assembled.model
        model.zero_grad(set_to_none=True)
        kit.run(model, kit.batch(assembled, samples)).loss.backward()
        return model

    return step


def test_adapter_names_and_routes():
    assert adapter_names_for(["image", "pointcloud"], "per_modality") == ["image", "pointcloud", TEXT_ADAPTER]
    assert adapter_names_for(["image", "pointcloud"], "shared") == [SHARED_ADAPTER]
    with pytest.raises(ValueError, match="unknown LoRA mode"):
        adapter_names_for(["image"], "per_layer")
    adapters = ["image", "pointcloud", "text"]
    assert route_for_sample(("pointcloud", "image"), adapters) == "pointcloud"  # first modality
    assert route_for_sample((), adapters) == "text"
    assert route_for_sample(("image",), ["shared"]) == "shared"
    assert route_for_sample((), ["shared"]) == "shared"


def test_image_batch_trains_only_the_image_projector_and_adapter(routed, backward, rows):
    model = backward(routed, rows["image"])
    assert every_nonzero(adapter_grads(model, "image").values())  # every LoRA A and B of every layer
    assert is_zero(adapter_grads(model, "pointcloud").values())
    assert is_zero(adapter_grads(model, "text").values())
    assert every_nonzero(p.grad for n, p in model.projectors["image"].named_parameters() if n.endswith("weight"))
    assert is_zero(p.grad for p in model.projectors["pointcloud"].parameters())
    # frozen: encoders and the base LLM get nothing
    assert all(p.grad is None for p in model.encoders.parameters())
    assert all(p.grad is None for n, p in model.llm.named_parameters() if "lora_" not in n)
    # marker embeddings: only the image markers that occur in the batch learn
    grad = model.embeddings.new_tokens.grad
    first = routed.first_new_token_id
    row = {t: routed.tokenizer.convert_tokens_to_ids(t) - first for t in ("<Img>", "</Img>", "<Pcl>", "</Pcl>")}
    assert grad[row["<Img>"]].any() and grad[row["</Img>"]].any()
    assert not grad[row["<Pcl>"]].any() and not grad[row["</Pcl>"]].any()


def test_text_batch_trains_only_the_text_adapter(routed, backward, rows):
    model = backward(routed, rows["text"])
    assert every_nonzero(adapter_grads(model, "text").values())
    assert is_zero(adapter_grads(model, "image").values())
    assert is_zero(adapter_grads(model, "pointcloud").values())
    for modality in ("image", "pointcloud"):
        assert is_zero(p.grad for p in model.projectors[modality].parameters())


def test_mixed_batch_trains_each_rows_adapter(routed, backward, rows):
    model = backward(routed, [rows["mixed"][1], rows["mixed"][3]])  # a point-cloud row and a text row
    assert every_nonzero(adapter_grads(model, "pointcloud").values())
    assert every_nonzero(adapter_grads(model, "text").values())
    assert is_zero(adapter_grads(model, "image").values())


def test_dummy_pass_runs_absent_modalities_in_training_only(routed, backward, rows, kit, monkeypatch):
    """Under ZeRO-3 or across processes every rank must run every module: a batch without point
    clouds then still runs the point-cloud encoder and projector on a blank input, adding 0 x output,
    and the projector gets a gradient tensor of zeros rather than none. One process skips it (issue 16:
    grouped batches paid a blank pass every step)."""
    model = routed.model
    calls = []
    encoder = model.encoders["pointcloud"]
    handle = encoder.register_forward_hook(lambda mod, args, out: calls.append(args[0].points.shape))
    try:
        backward(routed, rows["text"])
        assert calls == []  # one process, no ZeRO-3: nothing waits on this one
        assert all(p.grad is None for p in model.projectors["pointcloud"].parameters())
        model.zero_grad(set_to_none=True)
        monkeypatch.setattr(type(model), "_blank_pass_needed", lambda self, modality: True)
        backward(routed, rows["text"])
        cfg = model.encoders["pointcloud"].cfg
        assert calls == [torch.Size([1, cfg.num_points, cfg.in_channels])]  # the blank batch of one cloud
        for modality in ("image", "pointcloud"):
            grads = [p.grad for p in model.projectors[modality].parameters()]
            assert grads and all(g is not None for g in grads) and all(not g.any() for g in grads)
        # evaluation skips it: nothing is synchronised there
        calls.clear()
        model.eval()
        with torch.no_grad():
            kit.run(model, kit.batch(routed, rows["text"]))
        assert calls == []
    finally:
        handle.remove()


def test_the_dummy_pass_does_not_change_the_loss(routed, rows, kit, monkeypatch):
    model = routed.model
    monkeypatch.setattr(type(model), "_blank_pass_needed", lambda self, modality: True)
    batch = kit.batch(routed, rows["text"])
    train_loss = kit.run(model, batch).loss
    model.eval()
    with torch.no_grad():
        eval_loss = kit.run(model, batch).loss
    assert torch.equal(train_loss.detach(), eval_loss)  # dropout is 0; the dummy pass adds exact zeros


def test_shared_mode_routes_everything_to_one_adapter(assemble_model, randomize_lora, rows, kit):
    assembled = assemble_model(("image", "pointcloud"), mode="shared")
    model = assembled.model
    assert model.lora.adapters == [SHARED_ADAPTER]
    randomize_lora(model)
    trainable_parameters(model, "instruct")
    model.train()
    for samples in (rows["image"], rows["text"]):
        batch = kit.batch(assembled, samples)
        assert set(routes_for_rows(batch.modalities, model.lora.adapters)) == {SHARED_ADAPTER}
        model.zero_grad(set_to_none=True)
        kit.run(model, batch).loss.backward()
        assert every_nonzero(adapter_grads(model, SHARED_ADAPTER).values())
    # the adapter really applies to every row: disabling it changes every row's logits
    model.eval()
    batch = kit.batch(assembled, rows["mixed"])
    with torch.no_grad():
        with_lora = kit.run(model, batch).logits
        with model.lora.peft_model.disable_adapter():
            without = kit.run(model, batch).logits
    for row in range(len(rows["mixed"])):
        assert not torch.allclose(with_lora[row], without[row], atol=1e-3)


def _input_rows(samples, modality, row) -> list[int]:
    """Indices, in the batch's stacked inputs of ``modality``, of row ``row``'s inputs."""
    start = sum(len(s.inputs.get(modality, ())) for s in samples[:row])
    return list(range(start, start + len(samples[row].inputs[modality])))


def _select(batch, rows):
    """Inputs ``rows`` of a collated batch: a tensor, or a NamedTuple / tuple of them (each field)."""
    if isinstance(batch, torch.Tensor):
        return batch[rows]
    parts = [_select(part, rows) for part in batch]
    return type(batch)(*parts) if hasattr(batch, "_fields") else tuple(parts)


def test_per_row_routing_equals_each_row_alone(routed, rows, kit):
    """Rows routed to different adapters in one (padded) batch give the same logits as each row run
    alone with its adapter; and the route matters (another adapter gives other logits)."""
    model = routed.model.eval()
    mixed = rows["mixed"]
    batch = kit.batch(routed, mixed, seed=3)
    routes = routes_for_rows(batch.modalities, model.lora.adapters)
    assert routes == ["image", "pointcloud", "image", "text"]
    assert not batch.attention_mask.all()  # rows of different lengths: padding is exercised
    def every_position(b, **overrides):  # no labels: logits at every position, not only supervised ones
        return model(**{**b.model_kwargs(), "labels": None, **overrides})

    with torch.no_grad():
        together = every_position(batch)
        for row, sample in enumerate(mixed):
            single = kit.batch(routed, [sample])
            single.inputs = {m: _select(batch.inputs[m], _input_rows(mixed, m, row)) for m in sample.inputs}
            assert routes_for_rows(single.modalities, model.lora.adapters) == [routes[row]]
            alone = every_position(single)
            batched = together.logits[row][batch.attention_mask[row].bool()]
            torch.testing.assert_close(batched, alone.logits[0], atol=1e-5, rtol=0)
            # the same row routed elsewhere (the model routes from the modalities it is given)
            model.lora.set_routes(["text" if routes[row] != "text" else "image"], torch.device("cpu"))
            rerouted = every_position(single, modalities=None)
            assert (rerouted.logits[0] - alone.logits[0]).abs().max() > 1e-3


def test_routes_must_be_set_and_known(routed):
    model = routed.model
    with pytest.raises(ValueError, match="no LoRA adapter named"):
        model.lora.set_routes(["image", "audio"], torch.device("cpu"))
    model.lora._masks = None  # as after assembly: a forward with no routes is refused, not run unadapted
    with pytest.raises(RuntimeError, match="routes not set"):
        model.llm(input_ids=torch.tensor([[5, 6, 7]]))


def test_generation_is_the_same_batched_and_alone(routed, mm_host, input_files):
    mm = LoadedModel(routed, mm_host)
    img, pcl = [str(p) for p in input_files["image"]], [str(p) for p in input_files["pointcloud"]]
    samples = [
        Sample("a", (Turn("user", "<image> What is shown here ?"), Turn("assistant", "7")), {"image": (img[0],)}),
        Sample("b", (Turn("user", "hello world"), Turn("assistant", "yes"))),
        Sample("c", (Turn("user", "<pointcloud> Which shape is it ? <image>"), Turn("assistant", "cube")),
               {"pointcloud": (pcl[1],), "image": (img[2],)}),
        Sample("d", (Turn("user", "<pointcloud> Which shape is it ?"), Turn("assistant", "cube")),
               {"pointcloud": (pcl[0],)}),
    ]
    batched = mm.generate_batch(samples, max_new_tokens=6)
    alone = [mm.generate_batch([s], max_new_tokens=6)[0] for s in samples]
    assert batched == alone
    assert any(batched)  # the random model does say something
    # the string API prepends the placeholder the question lacks
    assert mm.generate("What is shown here ?", {"image": [img[0]]}, max_new_tokens=6) == mm.generate_batch(
        [Sample("x", (Turn("user", "<image>\nWhat is shown here ?"),), {"image": (img[0],)})], max_new_tokens=6)[0]

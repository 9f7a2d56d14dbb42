"""Runs trained by the previous release still load: their encoder identities were recorded in an earlier
format (tests/data/previous_release_identities.json, copied from a real run of commit 9599128), and
each plugin recomputes that format from the encoder it builds (``legacy_identities()``). A different
encoder must still be refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmkit.records import Sample, Turn
from mmkit.errors import CheckpointMismatchError
from mmkit.inference import LoadedModel
from mmkit.modeling.persistence import META, check_fingerprint, load_model, read_meta, save_model

PREVIOUS = json.loads((Path(__file__).parent / "data" / "previous_release_identities.json").read_text())["modalities"]


def build(mm_host, modality: str, **changes):
    from mmkit.modeling.components import build_encoder

    recorded = PREVIOUS[modality]
    return build_encoder(mm_host, mm_host.modality(modality), encoder_name=recorded["encoder"],
                         options={**recorded["encoder_options"], **changes})


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory, mm_host, tiny_llm, kit):
    """A trained run on the encoder options the previous release recorded, whose ``mmkit.json`` then
    carries the previous release's encoder identities (the rest of the format is unchanged)."""
    from mmkit.modeling.assemble import ModalityChoice, ModelConfig, assemble
    from mmkit.modeling.lora import LoraSettings

    torch.manual_seed(0)
    choices = tuple(ModalityChoice(m, encoder=PREVIOUS[m]["encoder"], encoder_options=PREVIOUS[m]["encoder_options"])
                    for m in ("image", "pointcloud"))
    assembled = assemble(ModelConfig(llm=str(tiny_llm("llama")), modalities=choices,
                                     lora=LoraSettings(r=4, alpha=8, dropout=0.0)), mm_host)
    with torch.no_grad():  # off the seeded init: the reload must take the run's stored encoder weights
        for p in [*assembled.model.encoders.parameters(), *assembled.model.projectors.parameters()]:
            p.add_(0.01 * torch.randn_like(p))
    run = tmp_path_factory.mktemp("previous") / "run"
    save_model(run, assembled, stage="instruct")
    meta_path = run / "model" / META
    meta = json.loads(meta_path.read_text())
    for m in ("image", "pointcloud"):
        assert meta["modalities"][m]["encoder_identity"] != PREVIOUS[m]["encoder_identity"]  # the format did change
        meta["modalities"][m]["encoder_identity"] = PREVIOUS[m]["encoder_identity"]
        meta["modalities"][m]["encoder_options"] = PREVIOUS[m]["encoder_options"]  # without the seed, as recorded
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))
    assembled.model.eval()
    return run, assembled


def test_a_previous_release_run_loads_with_identical_outputs(previous_run, mm_host, input_files):
    run, original = previous_run
    with pytest.warns(UserWarning, match="identity was recorded in an earlier format"):
        loaded = load_model(run, mm_host)
    before = dict(original.model.state_dict())
    after = loaded.model.state_dict()
    assert set(after) == set(before)
    for name, tensor in after.items():
        assert torch.equal(tensor, before[name]), name
    img, pcl = [str(p) for p in input_files["image"]], [str(p) for p in input_files["pointcloud"]]
    samples = [Sample("a", (Turn("user", "<image> What is shown here ?"),), {"image": (img[0],)}),
               Sample("b", (Turn("user", "<pointcloud> Which shape is it ?"),), {"pointcloud": (pcl[1],)})]
    assert (LoadedModel(loaded, mm_host).generate_batch(samples, max_new_tokens=6)
            == LoadedModel(original, mm_host).generate_batch(samples, max_new_tokens=6))


@pytest.mark.parametrize("modality", ["image", "pointcloud"])
def test_the_previous_format_is_recomputed_from_the_same_encoder(mm_host, modality):
    encoder = build(mm_host, modality)
    assert encoder.identity() != PREVIOUS[modality]["encoder_identity"]
    assert PREVIOUS[modality]["encoder_identity"] in json.loads(json.dumps(encoder.legacy_identities()))


@pytest.mark.parametrize(("modality", "changes", "key"), [
    ("image", {"feature_layer": -2}, "feature_layer"),  # other features from the same weights
    ("image", {"seed": 1}, "weights_sha256"),  # other weights: the previous digest recomputed differs
    ("image", {"drop_cls": False}, "drop_cls"),
    ("pointcloud", {"seed": 1}, "init"),
    ("pointcloud", {"widths": [64, 64]}, "config"),
    ("pointcloud", {"num_points": 128}, "preprocessing"),
])
def test_a_different_encoder_is_still_refused_against_a_previous_identity(mm_host, previous_run, modality, changes,
                                                                         key):
    run, original = previous_run
    other = build(mm_host, modality, **changes)
    assert all(ident.get(key) != PREVIOUS[modality]["encoder_identity"][key] for ident in other.legacy_identities())
    # the model as a reload builds it, with this one encoder swapped (check_fingerprint reads the LLM and encoders)
    encoders = {m: other if m == modality else build(mm_host, m) for m in PREVIOUS}
    model = SimpleNamespace(llm=original.model.llm, encoders=encoders)
    components = {**original.components, modality: {**original.components[modality],
                                                    "encoder_identity": other.identity()}}
    with pytest.raises(CheckpointMismatchError, match=f"the {modality} encoder differs from the one the checkpoint "
                                                      r"was trained with \(.*" + key):
        check_fingerprint(read_meta(run / "model"), model, components)


def test_an_edited_previous_identity_is_refused(previous_run, mm_host, tmp_path):
    """The saved identity must equal one recomputed from the encoder, not merely look like the old format."""
    run, _ = previous_run
    copy_dir = tmp_path / "run"
    shutil.copytree(run, copy_dir)
    meta_path = copy_dir / "model" / META
    meta = json.loads(meta_path.read_text())
    meta["modalities"]["image"]["encoder_identity"]["weights_sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointMismatchError, match="the image encoder differs.*weights_sha256"):
        load_model(copy_dir, mm_host)

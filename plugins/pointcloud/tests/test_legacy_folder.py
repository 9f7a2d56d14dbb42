"""Encoder folders and run identities written by the previous release (plugin 0.1.0) still load: its
``config.json`` nested the options (with ``seed``) under ``config``, and its identity recorded the
seed in the config, an ``init`` line, the plugin version and the weights file's sha256."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmkit.errors import CheckpointMismatchError
from mmkit.modeling.persistence import _compare_encoder
from mmkit_plugin_pointcloud.config import TINY
from mmkit_plugin_pointcloud.encoder import build_encoder

PREPROCESSING = {"centre": "centroid", "scale": "unit sphere (max radius 1)",
                 "resample": "farthest-point sampling from point 0, or cyclic repeat, to {n}",
                 "colour": "rgb in [0, 1], zeros when absent"}


def previous_release_folder(directory: Path, *, seed: int) -> Path:
    """What plugin 0.1.0's ``save_pretrained`` wrote (layout copied from commit 9599128)."""
    encoder = build_encoder(**TINY, seed=seed)
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(directory / "model.safetensors"),
              metadata={"format": "mmkit-pointnet2"})
    config = {**encoder.config, "seed": seed}
    (directory / "config.json").write_text(json.dumps({"format": "mmkit-pointnet2", "encoder": "pointnet2",
                                                       "plugin_version": "0.1.0", "config": config}))
    return directory


def previous_identity(folder: Path, config: dict, *, seed: int) -> dict:
    """What plugin 0.1.0's ``identity()`` recorded for an encoder loaded from ``folder``."""
    return {"class": "mmkit_plugin_pointcloud.encoder.PointNet2Encoder", "plugin_version": "0.1.0",
            "pretrained": str(folder), "init": "pretrained",
            "weights_sha256": hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest(),
            "config": {**config, "seed": seed},
            "preprocessing": {**PREPROCESSING, "resample": PREPROCESSING["resample"].format(n=config["num_points"])}}


def test_a_previous_release_folder_loads_with_its_weights(tmp_path):
    folder = previous_release_folder(tmp_path / "enc", seed=3)
    loaded = build_encoder(pretrained=str(folder), num_points=128)  # an override that keeps the shapes
    assert loaded.config["num_points"] == 128 and "seed" not in loaded.config
    saved = load_file(str(folder / "model.safetensors"))
    assert set(saved) == set(loaded.state_dict())
    assert all(torch.equal(saved[k], v) for k, v in loaded.state_dict().items())


def test_the_previous_identity_of_a_folder_matches_only_that_folder(tmp_path):
    folder = previous_release_folder(tmp_path / "enc", seed=3)
    loaded = build_encoder(pretrained=str(folder), num_points=128)
    old = previous_identity(folder, loaded.config, seed=3)
    assert _compare_encoder("pointcloud", old, loaded.identity(), loaded)  # accepted, with a note
    # The same folder with other weights (retrained in place): the recomputed file hash differs.
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v + 1 for k, v in state.items()}, str(folder / "model.safetensors"))
    changed = build_encoder(pretrained=str(folder), num_points=128)
    with pytest.raises(CheckpointMismatchError, match="pointcloud encoder differs.*weights_sha256"):
        _compare_encoder("pointcloud", old, changed.identity(), changed)


def test_a_random_init_previous_identity_needs_the_same_seed_and_config(tmp_path):
    encoder = build_encoder(**TINY, seed=0)
    old = {"class": "mmkit_plugin_pointcloud.encoder.PointNet2Encoder", "plugin_version": "0.1.0",
           "pretrained": None, "weights_sha256": None, "init": "random (seed 0)",
           "config": {**encoder.config, "seed": 0},
           "preprocessing": {**PREPROCESSING, "resample": PREPROCESSING["resample"].format(n=TINY["num_points"])}}
    assert _compare_encoder("pointcloud", old, encoder.identity(), encoder)
    other = build_encoder(**TINY, seed=1)
    with pytest.raises(CheckpointMismatchError, match="init"):
        _compare_encoder("pointcloud", old, other.identity(), other)
    # A folder in the current layout has no 0.1.0 identity (no release up to 0.1.0 could read it), only the one
    # recorded before the grouping moved into preprocess, which differs from today's by that line alone.
    current = build_encoder(pretrained=str(encoder.save_pretrained(tmp_path / "new")))
    (before_grouping,) = current.legacy_identities()
    now = current.identity()
    assert {k: v for k, v in before_grouping.items() if k != "preprocessing"} == \
        {k: v for k, v in now.items() if k != "preprocessing"}
    assert {**before_grouping["preprocessing"], "grouping": now["preprocessing"]["grouping"]} == now["preprocessing"]
    assert "grouping" not in before_grouping["preprocessing"]

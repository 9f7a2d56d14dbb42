"""The frozen-encoder feature cache: keys change with the encoder's identity and options, entries
are checked on read (a corrupt one is recomputed, an unreadable shard set aside), several writers
never corrupt it, and cached features give the same model outputs as online encoding."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mmkit.data.batching import Batches, Collator, SampleDataset, collate_fns, make_preprocessor, model_inputs
from mmkit.data.feature_cache import (
    FeatureCache,
    FeatureStore,
    content_hash,
    entry_key,
    open_training_cache,
    plugin_descriptions,
)
from mmkit.modeling.components import build_encoder
from mmkit.specs import resolve


def store(root: Path, **description) -> FeatureStore:
    return FeatureStore(root, prefix="m", description={"encoder": description or {"a": 1}}, shape=(2, 3)).open()


def _write_entries(root: str, start: int, count: int, seed: int) -> None:
    """Run in a separate process: write ``count`` entries (a few shards) into one store."""
    torch.manual_seed(seed)
    s = store(Path(root))
    s.shard_entries = 7
    for i in range(start, start + count):
        s.put(f"{i:064x}", torch.full((2, 3), float(i)))
    s.flush()


def test_identity_options_and_dtype_change_the_namespace(tmp_path, mm_host):
    spec = mm_host.modality("pointcloud")
    a = build_encoder(mm_host, spec)
    b = build_encoder(mm_host, spec)
    c = build_encoder(mm_host, spec, options={"seed": 1})  # other random weights
    d = build_encoder(mm_host, spec, options={"num_points": 128})  # other preprocessing
    desc = {"pointcloud": {"load": spec.load, "plugin": "pointcloud"}}

    def namespace(encoder, dtype="float32", description=desc):
        cache = FeatureCache.for_model(tmp_path, {"pointcloud": encoder}, descriptions=description, dtype=dtype)
        return cache.stores["pointcloud"].namespace

    assert namespace(a) == namespace(b)
    others = {namespace(c), namespace(d), namespace(a, "bfloat16"),
              namespace(a, description={"pointcloud": {"load": spec.load, "plugin": "pointcloud",
                                                       "plugin_version": "9"}})}
    assert namespace(a) not in others and len(others) == 4
    # the key hashes the file's bytes under the namespace
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    assert entry_key("n1", content_hash(f)) != entry_key("n2", content_hash(f))


def test_round_trip_and_checks(tmp_path):
    s = store(tmp_path)
    s.put("k1", torch.ones(2, 3))
    assert s.get("k1") is None  # not flushed yet: nothing half-written is ever visible
    shard = s.flush()
    assert shard.parent == s.directory and not list(s.directory.glob(".*.tmp"))
    assert torch.equal(s.get("k1"), torch.ones(2, 3))
    fresh = store(tmp_path)  # another process opening the same cache
    assert "k1" in fresh and torch.equal(fresh.get("k1"), torch.ones(2, 3))
    with pytest.raises(ValueError, match="shape"):
        s.put("k2", torch.ones(3, 3))
    assert (s.directory / "identity.json").is_file()


def _corrupt_entry(shard: Path, key: str) -> None:
    """Flip bytes inside one tensor's data (the header stays valid)."""
    with safe_open(str(shard), framework="pt") as fh:
        meta_len = int.from_bytes(shard.read_bytes()[:8], "little")
        keys = list(fh.keys())
    data = bytearray(shard.read_bytes())
    import json

    header = json.loads(data[8:8 + meta_len])
    start, _ = header[key]["data_offsets"]
    at = 8 + meta_len + start
    data[at:at + 4] = b"\xff\xff\xff\x7f"
    shard.write_bytes(bytes(data))
    assert key in keys


def test_a_corrupt_entry_is_detected_and_recomputed(tmp_path, mm_host, input_files):
    spec = mm_host.modality("image")
    encoder = build_encoder(mm_host, spec)
    preprocess = {"image": make_preprocessor(resolve(spec.load), encoder.preprocess)}
    paths = [("image", str(p)) for p in input_files["image"]]
    cache = FeatureCache.for_model(tmp_path, {"image": encoder}, descriptions={})
    stats = cache.fill(paths, encoders={"image": encoder}, preprocess=preprocess)
    assert (stats.encoded, stats.reused) == (3, 0)
    key = cache.key_for(*paths[1])
    good = cache.stores["image"].get(key).clone()
    _corrupt_entry(Path(cache.stores["image"].index[key][0]), key)

    again = FeatureCache.for_model(tmp_path, {"image": encoder}, descriptions={})
    assert again.lookup(*paths[1])[0] is None and again.stores["image"].bad_entries == 1
    stats = again.fill(paths, encoders={"image": encoder}, preprocess=preprocess)
    assert (stats.encoded, stats.reused, stats.recomputed) == (1, 2, 1)
    assert torch.equal(again.lookup(*paths[1])[0], good)
    # a third run finds the recomputed entry first (newest shard) and encodes nothing
    third = FeatureCache.for_model(tmp_path, {"image": encoder}, descriptions={})
    assert third.fill(paths, encoders={"image": encoder}, preprocess=preprocess).encoded == 0


def test_filling_the_cache_leaves_the_random_state_alone(tmp_path, mm_host, input_files):
    """A run that fills the cache must train exactly as one that finds it full: the fill's data
    loader drew its base seed from torch's global generator, so LoRA dropout after a cold cache
    differed from a warm one (the same run's loss differed from step 2 on)."""
    spec = mm_host.modality("image")
    encoder = build_encoder(mm_host, spec)
    preprocess = {"image": make_preprocessor(resolve(spec.load), encoder.preprocess)}
    paths = [("image", str(p)) for p in input_files["image"]]
    cache = FeatureCache.for_model(tmp_path, {"image": encoder}, descriptions={})
    torch.manual_seed(5)
    before = torch.get_rng_state()
    assert cache.fill(paths, encoders={"image": encoder}, preprocess=preprocess).encoded == 3
    assert torch.equal(torch.get_rng_state(), before)


def test_an_unreadable_shard_is_set_aside(tmp_path):
    s = store(tmp_path)
    for i in range(3):
        s.put(f"k{i}", torch.full((2, 3), float(i)))
    shard = s.flush()
    shard.write_bytes(shard.read_bytes()[:40])  # truncated
    fresh = store(tmp_path)
    assert "k0" not in fresh and fresh.quarantined == [str(shard)]
    assert not shard.exists() and list(shard.parent.glob(f"{shard.name}.*.corrupt"))


def test_a_shard_gone_after_listing_is_skipped(tmp_path):
    """Another process may set a shard aside (rename it) between this one listing the folder and
    reading the shard: the shard is skipped, not a FileNotFoundError out of refresh()."""
    s = store(tmp_path)
    s.put("k0", torch.ones(2, 3))
    s.flush()
    os.symlink(tmp_path / "moved-away", s.directory / "shard-gone.safetensors")  # listed, then gone
    fresh = store(tmp_path)
    assert torch.equal(fresh.get("k0"), torch.ones(2, 3)) and list(fresh.index) == ["k0"]


def test_a_shard_this_process_cannot_open_is_not_set_aside(tmp_path, monkeypatch):
    """A shard another user's run wrote without group read permission (or any OS-level failure to
    open it, such as too many open files) is not corrupt: it is left in place for whoever can read
    it, and this process encodes the entries itself."""
    import safetensors

    s = store(tmp_path)
    s.put("k0", torch.ones(2, 3))
    shard = s.flush()
    real = safetensors.safe_open

    def denied(path, *args, **kwargs):
        if str(path) == str(shard):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", denied)
    fresh = store(tmp_path)
    assert "k0" not in fresh and fresh.quarantined == [] and shard.exists()


def test_a_shard_that_cannot_be_written_is_a_clear_error(tmp_path, monkeypatch):
    """A full disk or a cache folder this user may not write: a ConfigError naming the cache folder
    and the reason (no half-written shard left), not a raw OSError from safetensors."""
    import safetensors.torch

    from mmkit.errors import ConfigError

    s = store(tmp_path)
    s.put("k0", torch.ones(2, 3))

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(ConfigError, match=rf"feature cache {s.directory}: cannot write a shard .*No space left"):
        s.flush()
    assert not list(s.directory.glob("*shard*"))


def test_concurrent_writers_do_not_corrupt(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    # two processes write overlapping keys at the same time, many small shards each
    procs = [ctx.Process(target=_write_entries, args=(str(tmp_path), start, 60, start)) for start in (0, 30)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    s = store(tmp_path)
    assert len(s.index) == 90 and not s.quarantined
    for i in range(90):
        assert torch.equal(s.get(f"{i:064x}"), torch.full((2, 3), float(i)))
    assert not [p for p in s.directory.iterdir() if p.name.endswith(".tmp")]


def test_cached_features_reproduce_online_encoding(tmp_path, assemble_model, kit, input_files, mm_host):
    assembled = assemble_model(("image", "pointcloud"))
    model = assembled.model.eval()
    preprocess = {m: make_preprocessor(resolve(mm_host.modality(m).load), model.encoders[m].preprocess)
                  for m in ("image", "pointcloud")}
    img, pcl = [str(p) for p in input_files["image"]], [str(p) for p in input_files["pointcloud"]]
    samples = [kit.sample("<image> What is shown here ?", "7", image=[img[0]]),
               kit.sample("<image> and <pointcloud> compare the two", "yes", image=[img[1]], pointcloud=[pcl[0]]),
               kit.sample("hello world", "yes no")]
    online = SampleDataset(samples, assembled.prompts, preprocess)
    collate = Collator(pad_id=0, collate=collate_fns(model.encoders))
    batch = collate([online[i] for i in range(3)])

    cache = open_training_cache(tmp_path, host=mm_host, encoders=dict(model.encoders), samples=samples,
                                preprocess=preprocess)
    cached = SampleDataset(samples, assembled.prompts, preprocess, cache=cache)
    item = cached[1]
    assert item["inputs"] == {} and [len(f) for f in item["features"].values()] == [1, 1]
    cached_batch = collate([cached[i] for i in range(3)])
    assert set(cached_batch.features) == {"image", "pointcloud"} and cached_batch.inputs == {}
    with torch.no_grad():
        a = model(**model_inputs(batch, "cpu"))
        b = model(**model_inputs(cached_batch, "cpu"))
    assert torch.allclose(a.logits, b.logits, atol=1e-5) and torch.allclose(a.loss, b.loss, atol=1e-6)
    # in training mode a modality missing from a cached batch runs its projector only (no encoder)
    model.train()
    calls = []
    hook = model.encoders["pointcloud"].register_forward_hook(lambda *_: calls.append(1))
    text_only = collate([cached[2]])
    assert text_only.features == {}
    model(**model_inputs(text_only, "cpu")).loss.backward()
    hook.remove()
    assert calls == []


def test_batches_recompute_entries_the_cache_lacks(tmp_path, assemble_model, kit, input_files, mm_host):
    assembled = assemble_model(("image",))
    model = assembled.model.eval()
    spec = mm_host.modality("image")
    preprocess = {"image": make_preprocessor(resolve(spec.load), model.encoders["image"].preprocess)}
    samples = [kit.sample("<image> What is shown here ?", str(i), image=[str(p)])
               for i, p in enumerate(input_files["image"])]
    cache = open_training_cache(tmp_path, host=mm_host, encoders={"image": model.encoders["image"]},
                                samples=samples[:1], preprocess=preprocess)  # only the first is cached
    dataset = SampleDataset(samples, assembled.prompts, preprocess, cache=cache)
    collator = Collator(pad_id=0, record_skipped=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collator)
    batches = Batches(loader, collator, cache=cache, encoders=model.encoders)
    (batch,) = list(batches)
    assert batch.pending is None and batch.features["image"].shape[0] == 3 and batches.recomputed == 2
    cache.flush()
    online = Collator(pad_id=0)([SampleDataset(samples, assembled.prompts, preprocess)[i] for i in range(3)])
    expected = model.encoders["image"](online.inputs["image"])
    assert torch.allclose(batch.features["image"], expected, atol=1e-6)
    reopened = FeatureCache.for_model(tmp_path, {"image": model.encoders["image"]},
                                      descriptions=plugin_descriptions(mm_host, ["image"]))
    assert all(reopened.lookup("image", str(p))[0] is not None for p in input_files["image"])
    # under ZeRO-3 the loop may not run an encoder: the batch names its records instead
    strict = Batches(torch.utils.data.DataLoader(
        SampleDataset(samples, assembled.prompts, preprocess,
                      cache=FeatureCache.for_model(tmp_path / "empty", {"image": model.encoders["image"]},
                                                   descriptions={})),
        batch_size=3, collate_fn=collator), collator, encoders=model.encoders, recompute_error="ZeRO-3")
    with pytest.raises(Exception, match=r"no usable cache entry \(ZeRO-3\)"):
        list(strict)


def test_stores_pickle_without_open_files(tmp_path):
    import pickle

    s = store(tmp_path)
    s.put("k", torch.ones(2, 3))
    s.flush()
    s.get("k")
    assert s._handles
    copy = pickle.loads(pickle.dumps(s))
    assert not copy._handles and torch.equal(copy.get("k"), torch.ones(2, 3))
    assert os.getpid() == copy._pid

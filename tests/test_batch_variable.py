"""The data path for inputs of variable size (contract 1.1), on a toy sequence modality with one token
per element (tests/plugins/mmkit_seq_toy.py): files -> preprocess -> per-input token counts -> prompt
-> the encoder's collate -> the model's ragged splice; the feature cache keeps one [n_i, dim] entry
(+ separator rows) per input and gives the same loss as online encoding; packing budgets real
lengths; and under ZeRO-3 two processes, one with sequences and one with text only, train to the
1-process result."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mmkit_seq_toy
from mmkit.data.batching import Batches, Collator, SampleDataset, collate_fns, count_input_tokens, input_counters, \
    make_preprocessor
from mmkit.data.feature_cache import FeatureCache, open_training_cache, plugin_descriptions
from mmkit.data.packing import sample_lengths
from mmkit.modeling.features import RaggedFeatures
from mmkit.plugins import PluginHost, set_host
from mmkit.records import Sample, Turn
from mmkit.specs import resolve

CORPUS = "How long is it ? short long hello world yes no"
TIMEOUT = 300


def seq_host() -> PluginHost:
    host = PluginHost(load_entrypoints=False)
    host.register(mmkit_seq_toy, name="seqtoy")
    return host


@pytest.fixture(scope="module")
def seq_data(tmp_path_factory) -> dict[str, object]:
    """8 records in pairs (2 sequences of 2-6 elements, 2 text-only, ...) and a tiny LLM: with
    shuffle off and a micro-batch of 2 on 2 processes, process 0 gets only sequences, process 1 only text."""
    from mmkit.demo.llm import build_tiny_llm

    root = tmp_path_factory.mktemp("seq_data")
    rng = np.random.default_rng(0)
    records, lengths = [], []
    for k in range(8):
        if (k // 2) % 2 == 0:
            n = [2, 6, 5, 3][len(lengths)]
            lengths.append(n)
            path = root / f"seq{k}.npy"
            np.save(path, rng.normal(size=(n, mmkit_seq_toy.DIM)).astype(np.float32))
            records.append({"id": f"seq-{k}", "seq": str(path), "conversations": [
                {"from": "human", "value": "<seq>\nHow long is it ?"},
                {"from": "gpt", "value": "long" if n > 4 else "short"}]})
        else:
            records.append({"id": f"text-{k}", "conversations": [
                {"from": "human", "value": "hello world"}, {"from": "gpt", "value": "yes" if k % 2 else "no"}]})
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    llm = build_tiny_llm(root / "llm", [CORPUS], hidden_size=32, num_layers=1, num_heads=2)
    return {"llm": str(llm), "data": str(data), "lengths": lengths, "root": root}


@pytest.fixture(scope="module")
def seq_model(seq_data):
    from mmkit.modeling.assemble import ModalityChoice, ModelConfig, assemble
    from mmkit.modeling.lora import LoraSettings

    torch.manual_seed(0)
    host = seq_host()
    assembled = assemble(ModelConfig(llm=seq_data["llm"], modalities=(ModalityChoice("seq"),),
                                     lora=LoraSettings(r=4, alpha=8, dropout=0.0)), host)
    return assembled, host


def _samples(seq_data) -> list[Sample]:
    root = Path(seq_data["root"])
    out = []
    for k, n in zip((0, 1, 4, 5), seq_data["lengths"], strict=True):
        out.append(Sample(f"seq-{k}", (Turn("user", "<seq> How long is it ?"),
                                       Turn("assistant", "long" if n > 4 else "short")),
                          {"seq": (str(root / f"seq{k}.npy"),)}))
    out.append(Sample("text", (Turn("user", "hello world"), Turn("assistant", "yes"))))
    return out


def test_variable_inputs_get_their_own_slot_counts_and_splice_in_order(seq_data, seq_model):
    assembled, host = seq_model
    model = assembled.model.eval()
    encoder = model.encoders["seq"]
    preprocess = {"seq": make_preprocessor(resolve(host.modality("seq").load), encoder.preprocess)}
    counters = input_counters(model.encoders, model.projectors)
    assert set(counters) == {"seq"}
    samples = _samples(seq_data)
    dataset = SampleDataset(samples, assembled.prompts, preprocess, counters=counters)
    items = [dataset[i] for i in range(len(samples))]
    placeholder = model.placeholder_ids["seq"]
    assert [item["input_ids"].count(placeholder) for item in items] == [*seq_data["lengths"], 0]
    # packing budgets each sample's real length, counted once up front
    tokens = count_input_tokens(samples, preprocess, counters)
    assert tokens[:4] == [{"seq": [n]} for n in seq_data["lengths"]] and tokens[4] is None
    assert sample_lengths(assembled.prompts, samples, input_tokens=tokens) == [len(it["input_ids"]) for it in items]

    batch = Collator(pad_id=0, collate=collate_fns(model.encoders))(items)
    padded, lengths = batch.inputs["seq"]  # the encoder's own collate: a padded tensor plus lengths
    assert padded.shape == (4, 6, mmkit_seq_toy.DIM) and lengths.tolist() == seq_data["lengths"]
    moved = batch.to("cpu", torch.bfloat16)
    assert moved.inputs["seq"][0].dtype == torch.bfloat16 and moved.inputs["seq"][1].dtype == torch.long
    with torch.no_grad():
        embeds = model.embed(batch.input_ids, batch.inputs)
        projected = model.encode("seq", batch.inputs["seq"])
    assert isinstance(projected, RaggedFeatures) and projected.counts == tuple(seq_data["lengths"])
    # sample i's slots hold exactly its own rows, in order; the separator rows got the learned embedding
    for row, rows in enumerate(projected.split()):
        assert torch.equal(embeds[row][batch.input_ids[row] == placeholder], rows)
    separator = model.projectors["seq"].separator
    assert torch.equal(projected.values[projected.separators], separator.expand(4, -1).detach())
    out = model(**batch.model_kwargs())
    assert torch.isfinite(out.loss)


def test_packed_rows_of_variable_inputs_give_each_sample_its_own_loss(seq_data, seq_model):
    from mmkit.data.packing import PackingCollator

    assembled, host = seq_model
    model = assembled.model.eval()
    preprocess = {"seq": make_preprocessor(resolve(host.modality("seq").load), model.encoders["seq"].preprocess)}
    dataset = SampleDataset(_samples(seq_data), assembled.prompts, preprocess,
                            counters=input_counters(model.encoders, model.projectors))
    items = [dataset[i] for i in range(4)]  # the sequences (a text sample would route to another adapter)
    collate = collate_fns(model.encoders)
    with torch.no_grad():
        alone = [float(model(**Collator(pad_id=0, collate=collate)([it]).model_kwargs()).loss) for it in items]
        packed = PackingCollator(pad_id=0, collate=collate)([dict(it, row=r) for it, r in zip(items, [0, 1, 0, 1])])
        out = model(**packed.model_kwargs())
    assert packed.inputs["seq"].lengths.tolist() == [2, 5, 6, 3]  # row 0's inputs, then row 1's
    keep = packed.labels[:, 1:] != -100  # the forward's logits: the supervised positions, in batch order
    losses = torch.nn.functional.cross_entropy(out.logits, packed.labels[:, 1:][keep], reduction="none")
    rows, segments = keep.nonzero()[:, 0], packed.segment_ids[:, 1:][keep]
    per_sample = []
    for r in range(2):
        for seg in range(1, int(packed.segment_ids[r].max()) + 1):
            per_sample.append(float(losses[(rows == r) & (segments == seg)].mean()))
    assert per_sample == pytest.approx([alone[i] for i in (0, 2, 1, 3)], abs=1e-5)


def test_cached_variable_features_give_the_online_loss(tmp_path, seq_data, seq_model):
    assembled, host = seq_model
    model = assembled.model.eval()
    encoder = model.encoders["seq"]
    preprocess = {"seq": make_preprocessor(resolve(host.modality("seq").load), encoder.preprocess)}
    counters = input_counters(model.encoders, model.projectors)
    samples = _samples(seq_data)
    collate = Collator(pad_id=0, collate=collate_fns(model.encoders), record_skipped=False)
    online = collate([SampleDataset(samples, assembled.prompts, preprocess, counters=counters)[i]
                      for i in range(len(samples))])
    # only the first two inputs cached: the others are encoded by Batches and written back
    cache = open_training_cache(tmp_path, host=host, encoders={"seq": encoder}, samples=samples[:2],
                                preprocess=preprocess)
    dataset = SampleDataset(samples, assembled.prompts, preprocess, counters=counters, cache=cache)
    loader = torch.utils.data.DataLoader(dataset, batch_size=len(samples), collate_fn=collate)
    (cached,) = list(Batches(loader, collate, cache=cache, encoders=model.encoders))
    assert cached.inputs == {} and isinstance(cached.features["seq"], RaggedFeatures)
    assert cached.features["seq"].counts == tuple(seq_data["lengths"])
    with torch.no_grad():
        a, b = model(**online.model_kwargs()), model(**cached.model_kwargs())
    assert torch.equal(a.loss, b.loss) and torch.equal(a.logits, b.logits)
    # every entry is now stored as [n_i, dim] with its separator rows
    reopened = FeatureCache.for_model(tmp_path, {"seq": encoder}, descriptions=plugin_descriptions(host, ["seq"]))
    for sample, n in zip(samples, seq_data["lengths"], strict=False):
        entry, _ = reopened.lookup("seq", sample.inputs["seq"][0])
        assert entry is not None and entry.values.shape == (n, encoder.output_dim)
        assert entry.separators is not None and entry.separators.tolist() == [False] * (n - 1) + [True]


# -- end to end -------------------------------------------------------------------------------------------
def _options(seq_data, out: Path, **extra) -> dict[str, object]:
    return {"llm": seq_data["llm"], "data": [seq_data["data"]], "output_dir": str(out), "modalities": ["seq"],
            "micro_batch_size": 2, "global_batch_size": 4, "max_steps": 4, "shuffle": False, "lora_dropout": 0.0,
            "lora_r": 4, "lora_alpha": 8, "num_threads": 1, "tensorboard": False, "log_every": 1, "lr": 1e-2,
            "warmup_ratio": 0.0, "seed": 0, **extra}


def _train_here(options: dict[str, object]) -> dict[str, object]:
    from mmkit.training.config import resolve_config
    from mmkit.training.recipe import train

    set_host(seq_host())
    try:
        return train(resolve_config(None, options))
    finally:
        set_host(None)


@pytest.fixture(scope="module")
def one_process(seq_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seq_one") / "run"
    summary = _train_here(_options(seq_data, out))
    assert summary["steps"] == 4
    return out


@pytest.mark.slow
def test_variable_modality_trains_and_the_feature_cache_gives_the_same_losses(seq_data, one_process, tmp_path):
    from drill import logged_losses, max_weight_diff

    cached = tmp_path / "cached"
    _train_here(_options(seq_data, cached, cache_features=str(tmp_path / "cache")))
    online, with_cache = logged_losses(one_process), logged_losses(cached)
    assert sorted(online) == [1, 2, 3, 4] and all(np.isfinite(v) for v in online.values())
    assert with_cache == online
    assert max_weight_diff(one_process, cached) == 0.0
    # cache_features: auto -> a cache in the run, filled by the loader worker in the first epoch
    auto = tmp_path / "auto"
    _train_here(_options(seq_data, auto, cache_features="auto", num_workers=1))
    assert logged_losses(auto) == online  # 2 epochs: the second reads what the worker stored
    from safetensors import safe_open

    shapes = []
    for shard in (auto / "feature_cache").glob("seq-*/shard-*.safetensors"):
        with safe_open(str(shard), framework="pt") as fh:
            shapes += [fh.get_slice(k).get_shape()[0] for k in fh.keys() if not k.endswith(".separators")]
    assert sorted(shapes) == sorted(seq_data["lengths"])  # each input encoded once, [n_i, dim] each


@pytest.mark.slow
def test_zero3_two_processes_variable_inputs_on_one_text_on_the_other(seq_data, one_process, tmp_path):
    """Process 0 gets only sequences, process 1 only text: process 1 runs the sequence encoder and
    projector on ``blank(1)`` so ZeRO-3's gathers pair up; no hang, the 1-process losses."""
    import drill
    from drill import logged_losses, max_weight_diff
    from mmkit.training.distributed import free_port

    out = tmp_path / "zero3"
    options = json.dumps(_options(seq_data, out, zero_stage=3))
    script = ("import sys, json, mmkit_seq_toy\n"
              "from mmkit.plugins import PluginHost, set_host\n"
              "host = PluginHost(load_entrypoints=False); host.register(mmkit_seq_toy, name='seqtoy'); set_host(host)\n"
              "from mmkit.training.config import resolve_config\n"
              "from mmkit.training.recipe import train\n"
              "train(resolve_config(None, json.loads(sys.argv[1])))\n")
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = drill.child_env({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        env["PYTHONPATH"] = os.pathsep.join([str(Path(mmkit_seq_toy.__file__).parent),
                                             *filter(None, [env.get("PYTHONPATH")])])
        procs.append(subprocess.Popen([sys.executable, "-c", script, options], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    losses, expected = logged_losses(out), logged_losses(one_process)
    assert sorted(losses) == [1, 2, 3, 4]
    assert max(abs(losses[s] - expected[s]) for s in expected) <= 1e-5
    assert max_weight_diff(one_process, out) <= 1e-6


@pytest.mark.parametrize("method, message", [
    ("num_tokens_for", "num_tokens_for raised ValueError: bad item"),
    ("collate", "collate of 2 input(s) raised ValueError: bad item"),
])
def test_a_plugins_count_or_collate_fault_is_a_plugin_error_naming_it(monkeypatch, method, message):
    from mmkit.errors import PluginError
    from mmkit.modeling.components import build_encoder

    host = seq_host()
    encoder = build_encoder(host, host.modality(mmkit_seq_toy.MODALITY))

    def broken(*args, **kwargs):
        raise ValueError("bad\nitem")

    monkeypatch.setattr(type(encoder), method, broken)
    items = [torch.ones(3, mmkit_seq_toy.DIM), torch.ones(2, mmkit_seq_toy.DIM)]
    counters = input_counters({"seq": encoder}, {"seq": torch.nn.Identity()})
    with pytest.raises(PluginError, match=f"plugin seqtoy, modality {mmkit_seq_toy.MODALITY}.*{re.escape(message)}"):
        if method == "num_tokens_for":
            counters["seq"].of_item(items[0])
        else:
            collate_fns({"seq": encoder})["seq"](items)


def test_a_count_that_is_not_a_token_count_is_refused(monkeypatch):
    from mmkit.errors import PluginError
    from mmkit.modeling.components import build_encoder
    from mmkit.modeling.encoder import count_tokens

    host = seq_host()
    encoder = build_encoder(host, host.modality(mmkit_seq_toy.MODALITY))
    monkeypatch.setattr(type(encoder), "num_tokens_for", lambda self, item: 2.5)
    with pytest.raises(PluginError, match="num_tokens_for returned 2.5"):
        count_tokens(encoder, torch.ones(3, mmkit_seq_toy.DIM))

"""The plugin author's kit: safe array files (mmkit.io), the encoder base (PretrainedEncoder),
plugin faults named (load / preprocess / encode / identity), the linear probe, the vocabulary warning."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from torch import nn

from mmkit import InputError, MmkitError
from mmkit.data.batching import SampleDataset, make_preprocessor
from mmkit.training.skipped import skipped_records, write_skipped
from mmkit.errors import DataError, PluginError
from mmkit.io import load_array, save_array
from mmkit.modeling import ModalityEncoder, PretrainedEncoder
from mmkit.modeling.components import build_encoder, check_encoders, encoder_options
from mmkit.plugins import PluginHost
from mmkit.specs import EncoderSpec, MarkerSpec, ModalitySpec


# -- mmkit.io ---------------------------------------------------------------------------------------
def test_arrays_round_trip_in_every_format(tmp_path: Path):
    data = np.arange(12, dtype=np.float32).reshape(4, 3) / 7
    for suffix in (".npy", ".npz", ".csv", ".tsv", ".txt"):
        path = save_array(tmp_path / f"a{suffix}", data)
        np.testing.assert_allclose(load_array(path), data, rtol=1e-6)


@pytest.mark.parametrize(("name", "content", "reason"), [
    ("header.csv", "x;y\n1;2\n3;4\n", None),  # header and ';' sniffed
    ("bom.csv", "\ufeffa,b\n1,2\n", None),
    ("word.csv", "a\n1\ntwo\n", "line 3, column 1: 'two' is not a number"),
    ("ragged.csv", "1,2\n3\n", "line 2 has 1 columns; the first data row has 2"),
    ("nan.csv", "1\nnan\n", "1 NaN or infinite value"),
    ("onlyheader.tsv", "a\tb\n", "only a header row"),
    ("empty.csv", "", "empty file"),
    ("data.bin", "1,2", "unsupported file type '.bin'"),
])
def test_text_arrays(tmp_path: Path, name, content, reason):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    if reason is None:
        assert load_array(path).shape == (len(content.strip().splitlines()) - 1, 2)
        return
    with pytest.raises(InputError, match=reason) as info:
        load_array(path)
    assert info.value.path == str(path)


def test_npy_is_never_unpickled_and_sizes_are_checked_before_reading(tmp_path: Path):
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="refusing to unpickle"):
        load_array(pickled)
    big = save_array(tmp_path / "big.npy", np.zeros(1000, dtype=np.float32))
    with pytest.raises(InputError, match="1,000 values .* limit is 100"):
        load_array(big, max_elements=100)
    truncated = tmp_path / "cut.npy"
    truncated.write_bytes(big.read_bytes()[:-100])
    with pytest.raises(InputError, match="truncated .npy"):
        load_array(truncated)
    two = tmp_path / "two.npz"
    np.savez(two, a=np.zeros(3), b=np.ones(3))
    with pytest.raises(InputError, match="holds 2 arrays"):
        load_array(two)
    assert load_array(two, key="b").tolist() == [1, 1, 1]


def test_input_error_needs_no_path():
    err = InputError("expected 3 channels, got 6")
    assert (err.path, err.reason, str(err)) == (None, "expected 3 channels, got 6", "expected 3 channels, got 6")
    import pickle

    again = pickle.loads(pickle.dumps(InputError("/x.npy", "bad")))
    assert (again.path, again.reason) == ("/x.npy", "bad")


# -- the encoder base ---------------------------------------------------------------------------------
class Tiny(PretrainedEncoder):
    def __init__(self, config):
        super().__init__(config)
        self.num_tokens, self.output_dim, self.input_shape = 2, config.get("width", 4), (6,)
        self.proj = nn.Linear(3, self.output_dim)

    def preprocess(self, raw):
        x = np.asarray(raw, dtype=np.float32)
        if x.shape != (6,):
            raise InputError(f"expected 6 values, got shape {x.shape}")
        return torch.from_numpy(x)

    def forward(self, x):
        return self.proj(x.view(x.shape[0], 2, 3))


def test_pretrained_encoder_seeds_saves_loads_and_hashes(tmp_path: Path):
    before = torch.random.get_rng_state()
    a, b, c = Tiny.build(seed=1), Tiny.build(seed=1), Tiny.build(seed=2)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is left alone
    assert a.identity() == b.identity() != c.identity()
    a.save_pretrained(tmp_path / "saved")
    loaded = Tiny.build(pretrained=str(tmp_path / "saved"), seed=5)  # a seed does not apply to loaded weights
    assert loaded.identity()["weights_sha256"] == a.identity()["weights_sha256"]
    assert loaded.identity()["pretrained"] == str(tmp_path / "saved")
    json.dumps(loaded.identity())
    with pytest.raises(MmkitError, match="shape mismatch"):
        Tiny.from_pretrained(tmp_path / "saved", width=5)
    with pytest.raises(MmkitError, match="lacks config.json and model.safetensors"):
        Tiny.from_pretrained(tmp_path)


# -- plugin faults, named ------------------------------------------------------------------------------
class WrongWidth(Tiny):
    def forward(self, x):
        return super().forward(x)[..., :3]


class Raises(Tiny):
    def forward(self, x):
        raise RuntimeError("mat1 and mat2 shapes\ncannot be multiplied")


class NoIdentity(ModalityEncoder):
    num_tokens, output_dim, input_shape = 2, 4, (6,)

    def preprocess(self, raw):
        return torch.zeros(6)

    def forward(self, x):
        return torch.zeros(x.shape[0], 2, 4)


def _host(build, modality="sonar") -> PluginHost:
    class Plugin:
        from mmkit import hookimpl

        @hookimpl
        def mmkit_modalities(self):
            return [ModalitySpec(name=modality, data_keys=(modality,), markers=MarkerSpec(f"<{modality}>"),
                                 load=np.load, encoder=f"{modality}_enc", projector="mlp")]

        @hookimpl
        def mmkit_encoders(self):
            return [EncoderSpec(name=f"{modality}_enc", modality=modality, build=build)]

    host = PluginHost(load_entrypoints=False)
    host.register(Plugin(), name="acme")
    return host


@pytest.mark.parametrize(("cls", "message"), [
    (WrongWidth, r"plugin acme, modality sonar, encoder sonar_enc: encode returned features of shape \[2, 2, 3\], "
                 r"declared \[batch=2, num_tokens=2, output_dim=4\]"),
    (Raises, "plugin acme, modality sonar, encoder sonar_enc: encode raised RuntimeError: mat1 and mat2 shapes "
             "cannot be multiplied"),
])
def test_encode_faults_name_plugin_modality_and_shapes(cls, message):
    host = _host(cls.build)
    encoder = build_encoder(host, host.modality("sonar"))
    with pytest.raises(PluginError, match=message):
        encoder(encoder.blank_input(2))
    assert any(message.replace("\\", "") in p.replace("\\", "") or "encode" in p for p in check_encoders(host))


def test_missing_identity_is_refused_when_built_and_by_plugins_check():
    host = _host(lambda **_: NoIdentity())
    with pytest.raises(PluginError, match="modality sonar.*does not implement identity"):
        build_encoder(host, host.modality("sonar"))
    assert [p for p in check_encoders(host) if "identity" in p]


def test_the_seed_is_passed_and_recorded():
    host = _host(Tiny.build)
    assert encoder_options(host, host.modality("sonar"))["seed"] == 0
    first = build_encoder(host, host.modality("sonar"), options={"seed": 3})
    again = build_encoder(host, host.modality("sonar"), options={"seed": 3})
    assert first.identity() == again.identity() and first.seed == 3


def test_preprocess_errors_name_file_plugin_and_record(tmp_path: Path):
    host = _host(Tiny.build)
    encoder = build_encoder(host, host.modality("sonar"))
    good, bad = tmp_path / "good.npy", tmp_path / "bad.npy"
    np.save(good, np.zeros(6, dtype=np.float32))
    np.save(bad, np.zeros(7, dtype=np.float32))
    run = make_preprocessor(np.load, encoder.preprocess)
    assert run(good).shape == (6,)
    with pytest.raises(InputError) as info:
        run(bad)
    assert str(info.value) == f"{bad}: plugin acme, modality sonar: preprocess: expected 6 values, got shape (7,)"

    def crashes(raw):
        raise IndexError("index 6 is out of bounds")

    with pytest.raises(InputError, match="plugin acme, modality sonar: preprocess raised IndexError: index 6"):
        make_preprocessor(np.load, crashes, modality="sonar", plugin="acme")(good)

    from mmkit.records import Sample, Turn

    sample = Sample(id="rec-7", turns=(Turn("user", "<sonar>"), Turn("assistant", "x")), inputs={"sonar": (str(bad),)},
                    source="train.jsonl", index=7)

    class Prompts:
        def encode_sample(self, _sample):
            return None

    strict = SampleDataset([sample], Prompts(), {"sonar": run})
    with pytest.raises(DataError) as info:
        strict[0]
    message = str(info.value)
    assert "\n" not in message and "train.jsonl record 7 (id rec-7)" in message and str(bad) in message
    assert "plugin acme" in message
    skipped = SampleDataset([sample], Prompts(), {"sonar": run}, skip_bad_records=True)[0]
    records = skipped_records([skipped])
    assert records == [{"record": "train.jsonl record 7 (id rec-7)", "reason": skipped.reason}]
    lines = write_skipped(tmp_path / "skipped.jsonl", records).read_text().splitlines()
    assert [json.loads(line)["record"] for line in lines] == ["train.jsonl record 7 (id rec-7)"]


def test_preprocess_check_for_validate_uses_the_tiny_encoder(tmp_path: Path):
    from mmkit.data import preprocess_check

    host = _host(Tiny.build)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros(7, dtype=np.float32))
    with pytest.raises(InputError, match="plugin acme, modality sonar: preprocess: expected 6 values"):
        preprocess_check.check("sonar", host)(bad)
    preprocess_check._CHECKS.pop("sonar", None)


# -- test kit ------------------------------------------------------------------------------------------
def test_linear_probe_separates_what_the_encoder_separates(tmp_path: Path):
    from mmkit.testing import linear_probe

    encoder = Tiny.build(seed=0, width=8)
    examples = []
    rng = np.random.default_rng(0)
    for i in range(40):
        label = "up" if i % 2 else "down"
        path = tmp_path / f"{i}.npy"
        np.save(path, ((1 if label == "up" else -1) * np.linspace(0, 1, 6) + 0.1 * rng.standard_normal(6)).astype("f4"))
        examples.append((path, label))
    result = linear_probe(encoder, np.load, examples[:30], examples[30:])
    assert result.test_accuracy == 1.0 and result.chance == 0.5 and result.classes == ("down", "up")
    scrambled = [(p, "up" if i % 3 else "down") for i, (p, _) in enumerate(examples)]
    assert linear_probe(encoder, np.load, scrambled[:30], scrambled[30:]).test_accuracy < 1.0


def test_unknown_answer_words_are_warned_about():
    from mmkit.records import Sample, Turn
    from mmkit.data.vocab import unknown_words_warning
    from mmkit.demo.llm import build_general_tokenizer, build_tokenizer

    samples = [Sample(id="1", turns=(Turn("user", "what is it?"), Turn("assistant", "a sawtooth wave")))]
    narrow = build_tokenizer(["what is it ?", "a wave"])
    warning = unknown_words_warning(narrow, samples)
    assert warning and "1 answer word(s)" in warning and "'sawtooth'" in warning and "--llm tiny" in warning
    assert unknown_words_warning(build_general_tokenizer(), samples) is None


def test_an_encoder_fault_in_training_names_the_batch_records():
    from mmkit.data.batching import in_batch
    from mmkit.training.trainer import forward_batch

    host = _host(WrongWidth.build)
    encoder = build_encoder(host, host.modality("sonar"))

    def engine(**inputs):
        return encoder(inputs["inputs"]["sonar"])

    from mmkit.data.batch import Batch

    batch = Batch(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long),
                  torch.ones(2, 3, dtype=torch.long), inputs={"sonar": torch.zeros(2, 6)}, ids=["rec-1", "rec-2"],
                  modalities=(("sonar",), ("sonar",)))
    with pytest.raises(PluginError, match=r"plugin acme, modality sonar.*declared .* \(in the batch of records "
                                          r"rec-1, rec-2\)"):
        forward_batch(engine, batch, "cpu")
    assert str(in_batch(PluginError("x"), attrs.evolve(batch, ids=list(range(10))))).endswith("records 0, 1, 2, 3, 4, 5, 6, 7 and 2 more)")


def test_the_weights_hash_is_of_the_weights_as_built_not_after_a_bf16_cast():
    """A bf16 run casts its frozen encoders after building them; the identity it records (and the one
    a later load computes, before casting) must name the same weights, or the run cannot be loaded."""
    import torch

    import mmkit_seq_toy

    built = mmkit_seq_toy.build(hidden=8, seed=3)
    cast = mmkit_seq_toy.build(hidden=8, seed=3).to(torch.bfloat16)
    assert cast.identity()["weights_sha256"] == built.identity()["weights_sha256"]
    assert mmkit_seq_toy.build(hidden=8, seed=4).identity()["weights_sha256"] != built.identity()["weights_sha256"]

"""The modality contract suite (see :mod:`mmkit.testing`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from mmkit.errors import InputError


class ModalityContract:
    """Base class of the contract tests; subclasses set ``modality`` and the two file makers."""

    modality: ClassVar[str]
    #: Options for the encoder; default: the modality's demo options over the encoder's tiny config.
    encoder_options: ClassVar[dict[str, Any] | None] = None
    #: Absolute tolerance of the batch-invariance check.
    atol: ClassVar[float] = 1e-5
    #: Torch threads while the contract runs (pinned: small tests on many cores spend their time
    #: synchronising threads, and parallel test runs oversubscribe the machine). ``None``: leave as is.
    num_threads: ClassVar[int | None] = 1
    #: The frozen-encoder trap: with a value set, a linear probe on the frozen encoder's features of
    #: the demo task must reach this held-out accuracy (see :func:`mmkit.testing.probe.linear_probe`).
    separability_threshold: ClassVar[float | None] = None
    #: Keyword arguments of the demo builder for the probe (e.g. a smaller ``per_class_train``).
    probe_demo_options: ClassVar[dict[str, Any]] = {}
    #: At most this many train / test demo records are encoded by the probe.
    probe_max_records: ClassVar[int] = 400

    # -- to implement -------------------------------------------------------------------------
    def make_valid_files(self, tmp_path: Path) -> list[Path]:
        """Write at least two distinct valid input files and return their paths."""
        raise NotImplementedError

    def make_invalid_files(self, tmp_path: Path) -> dict[str, Path]:
        """Write unusable files (corrupt, wrong shape, NaN, ...); map a description to each path."""
        raise NotImplementedError

    # -- fixtures --------------------------------------------------------------------------------
    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _pinned_threads(cls):
        if cls.num_threads is None:
            yield
            return
        torch = pytest.importorskip("torch")
        before = torch.get_num_threads()
        torch.set_num_threads(cls.num_threads)
        yield
        torch.set_num_threads(before)

    @pytest.fixture(scope="class")
    @classmethod
    def host(cls):
        from mmkit.plugins import PluginHost

        return PluginHost()

    @pytest.fixture(scope="class")
    @classmethod
    def spec(cls, host):
        return host.modality(cls.modality)

    @pytest.fixture(scope="class")
    @classmethod
    def encoder(cls, host, spec):
        from mmkit.modeling.components import build_encoder

        torch = pytest.importorskip("torch")
        torch.manual_seed(0)
        enc = build_encoder(host, spec, options=cls.encoder_options)
        return enc.eval()

    @pytest.fixture
    def valid_files(self, tmp_path):
        files = self.make_valid_files(tmp_path)
        assert len(files) >= 2, "make_valid_files must return at least two files"
        return files

    # -- the contract ----------------------------------------------------------------------------
    def test_registered_and_consistent(self, host, spec):
        assert self.modality in host.modalities()
        problems = [p for p in host.check() if self.modality in p or host.provider("modality", self.modality) in p]
        assert not problems, problems

    def test_lazy_references_resolve(self, host):
        owner = host.provider("modality", self.modality)
        assert not [p for p in host.verify_lazy() if p.startswith(owner + ":")]

    def test_plugin_import_does_not_import_torch(self, host):
        owner = host.provider("modality", self.modality)
        module = host.records[owner].module.__name__
        code = f"import sys, {module}; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))"
        out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == [], f"importing {module} imports {out.stdout.strip()}"

    def test_preprocess_shape_and_dtype(self, spec, encoder, valid_files):
        from mmkit.specs import resolve

        load = resolve(spec.load)
        for path in valid_files:
            x = encoder.preprocess(load(path))
            assert tuple(x.shape) == tuple(encoder.input_shape), path
            assert x.dtype.is_floating_point
            assert bool(x.isfinite().all()), f"{path}: preprocessing produced NaN/inf"

    def test_encode_shape_dtype_and_finite(self, spec, encoder, valid_files):
        batch = self._batch(spec, encoder, valid_files)
        with _no_grad():
            out = encoder(batch)
        assert tuple(out.shape) == (len(valid_files), encoder.num_tokens, encoder.output_dim)
        assert out.dtype.is_floating_point
        assert bool(out.isfinite().all())

    def test_batch_invariance(self, spec, encoder, valid_files):
        import torch

        batch = self._batch(spec, encoder, valid_files)
        with _no_grad():
            together = encoder(batch)
            alone = torch.cat([encoder(batch[i:i + 1]) for i in range(len(valid_files))])
        assert torch.allclose(together, alone, atol=self.atol), float((together - alone).abs().max())

    def test_deterministic(self, spec, encoder, valid_files):
        import torch

        batch = self._batch(spec, encoder, valid_files)
        with _no_grad():
            assert torch.equal(encoder(batch), encoder(batch))

    def test_distinct_inputs_give_distinct_features(self, spec, encoder, valid_files):
        import torch

        batch = self._batch(spec, encoder, valid_files)
        with _no_grad():
            out = encoder(batch)
        assert not torch.allclose(out[0], out[1]), "two different inputs encode identically"

    def test_identity_is_json(self, encoder):
        ident = encoder.identity()
        assert isinstance(ident, dict) and ident
        json.dumps(ident)

    def test_missing_file_is_a_clear_error(self, spec, tmp_path):
        from mmkit.specs import resolve

        missing = tmp_path / "does-not-exist.bin"
        with pytest.raises(InputError) as info:
            resolve(spec.load)(missing)
        assert str(missing) in str(info.value)

    def test_invalid_files_are_clear_errors(self, spec, tmp_path):
        from mmkit.specs import resolve

        load = resolve(spec.load)
        cases = self.make_invalid_files(tmp_path)
        assert cases, "make_invalid_files must return at least one case"
        for description, path in cases.items():
            with pytest.raises(InputError) as info:
                load(path)
            assert str(path) in str(info.value), f"{description}: error does not name the file"
            assert info.value.reason, f"{description}: error gives no reason"

    def test_demo_task_builds(self, host, spec, tmp_path):
        if spec.demo is None:
            pytest.skip("no demo task")
        from mmkit.records import ReadContext, parse_record
        from mmkit.specs import DemoTask, resolve

        task = resolve(spec.demo.build)(tmp_path, seed=0)
        assert isinstance(task, DemoTask)
        assert len(task.train) > 0 and len(task.test) > 0 and len(task.answers) >= 2
        ctx = ReadContext(modalities=host.modalities(), data_root=tmp_path, check_files=True)
        load = resolve(spec.load)
        for i, rec in enumerate(task.train[:5] + task.test[:5]):
            sample = parse_record(rec, ctx=ctx, base=tmp_path, source="demo", index=i)
            for path in sample.inputs.get(spec.name, ()):
                load(Path(path))

    def test_demo_features_are_separable(self, spec, encoder, tmp_path):
        """The frozen-encoder trap: a linear probe on the frozen features of the demo must beat the
        author's threshold, or training the projector and LoRA cannot learn the demo either."""
        if self.separability_threshold is None:
            pytest.skip("set separability_threshold to probe the frozen features of the demo")
        if spec.demo is None:
            pytest.skip("no demo task")
        from mmkit.specs import resolve
        from mmkit.testing.probe import demo_examples, linear_probe

        task = resolve(spec.demo.build)(tmp_path, seed=0, **self.probe_demo_options)
        key = spec.data_keys[0]
        # a seeded random subset of each split (demo records are often ordered by class)
        train = _spread(demo_examples(task.train, key, tmp_path), self.probe_max_records)
        test = _spread(demo_examples(task.test, key, tmp_path), self.probe_max_records)
        result = linear_probe(encoder, resolve(spec.load), train, test)
        assert result.test_accuracy >= self.separability_threshold, (
            f"a linear probe on the frozen {self.modality} features reaches {result.test_accuracy:.2f} held-out "
            f"accuracy (train {result.train_accuracy:.2f}, chance {result.chance:.2f}); the threshold is "
            f"{self.separability_threshold}. A frozen encoder whose features do not separate the classes cannot "
            "be rescued by training the projector: change its init or architecture.")

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _batch(spec, encoder, files):
        import torch

        from mmkit.specs import resolve

        load = resolve(spec.load)
        return torch.stack([encoder.preprocess(load(p)) for p in files])


def _spread(items: list, limit: int) -> list:
    """A seeded random subset of at most ``limit`` items, in their order."""
    import random

    if len(items) <= limit:
        return items
    keep = sorted(random.Random(0).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def _no_grad():
    import torch

    return torch.no_grad()

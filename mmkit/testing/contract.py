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
    #: Largest difference of the bf16-parameter forward from the fp32 one, relative to the features' scale.
    mixed_precision_tolerance: ClassVar[float] = 0.1
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
        import os

        owner = host.provider("modality", self.modality)
        module = host.records[owner].module.__name__
        code = f"import sys, {module}; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))"
        # this process's import path, so a plugin registered in-process imports in the child too
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True,
                             env=env)
        assert json.loads(out.stdout) == [], f"importing {module} imports {out.stdout.strip()}"

    def test_preprocess_shape_and_dtype(self, spec, encoder, valid_files):
        from mmkit.specs import resolve

        load = resolve(spec.load)
        for path in valid_files:
            x = encoder.preprocess(load(path))
            if encoder.input_shape is not None:
                assert tuple(x.shape) == tuple(encoder.input_shape), path
                assert x.dtype.is_floating_point
            floats = [t for t in _tensors(x) if t.is_floating_point()]
            assert floats, f"{path}: preprocess returned no floating-point tensor ({type(x).__name__})"
            assert all(bool(t.isfinite().all()) for t in floats), f"{path}: preprocessing produced NaN/inf"
            count = encoder.num_tokens_for(x)
            assert isinstance(count, int) and not isinstance(count, bool) and count >= 1, (
                f"{path}: num_tokens_for returned {count!r}, declared a positive int")
            if encoder.num_tokens is not None:
                assert count == encoder.num_tokens, path

    def test_encode_shape_dtype_and_finite(self, spec, encoder, valid_files):
        items = self._items(spec, encoder, valid_files)
        with _no_grad():
            out = encoder(encoder.collate(items))
        if encoder.num_tokens is not None:
            assert tuple(out.shape) == (len(valid_files), encoder.num_tokens, encoder.output_dim)
        else:
            from mmkit.modeling.features import RaggedFeatures

            assert isinstance(out, RaggedFeatures), type(out).__name__
            assert out.dim == encoder.output_dim
        values = _values(out)
        assert values.dtype.is_floating_point
        assert bool(values.isfinite().all())

    def test_token_counts_as_announced(self, spec, encoder, valid_files):
        """Each input gets the tokens ``num_tokens_for`` announced before encoding: the prompt
        reserved exactly that many slots for it."""
        items = self._items(spec, encoder, valid_files)
        announced = [encoder.num_tokens_for(item) for item in items]
        with _no_grad():
            out = encoder(encoder.collate(items))
        assert _counts(out) == announced, f"encoded {_counts(out)} tokens per input, num_tokens_for said {announced}"

    def test_collate_of_mixed_sizes(self, spec, encoder, valid_files):
        """``collate`` batches inputs of different sizes (a variable-size encoder: ``make_valid_files``
        must include some) in any order; the counts come back per input, in that order."""
        items = self._items(spec, encoder, valid_files)
        counts = [encoder.num_tokens_for(item) for item in items]
        if encoder.num_tokens is None:
            assert len(set(counts)) >= 2, ("make_valid_files must return inputs of different sizes for a "
                                           f"variable-size encoder; their token counts are {counts}")
        order = sorted(range(len(items)), key=lambda i: -counts[i])  # another order: the counts follow the items
        with _no_grad():
            out = encoder(encoder.collate([items[i] for i in order]), counts=[counts[i] for i in order])
        assert _counts(out) == [counts[i] for i in order]

    def test_batch_invariance(self, spec, encoder, valid_files):
        """A collated batch encodes as its items one by one (padding or batching never leaks
        between inputs)."""
        import torch

        items = self._items(spec, encoder, valid_files)
        with _no_grad():
            together = _per_input(encoder(encoder.collate(items)))
            alone = [_per_input(encoder(encoder.collate([item])))[0] for item in items]
        for i, (a, b) in enumerate(zip(together, alone, strict=True)):
            assert a.shape == b.shape, f"input {i}: {list(a.shape)} in the batch, {list(b.shape)} alone"
            assert torch.allclose(a, b, atol=self.atol), f"input {i}: {float((a - b).abs().max())}"

    def test_deterministic(self, spec, encoder, valid_files):
        import torch

        batch = self._batch(spec, encoder, valid_files)
        with _no_grad():
            assert torch.equal(_values(encoder(batch)), _values(encoder(batch)))

    def test_distinct_inputs_give_distinct_features(self, spec, encoder, valid_files):
        import torch

        batch = self._batch(spec, encoder, valid_files)
        with _no_grad():
            first, second = _per_input(encoder(batch))[:2]
        assert first.shape != second.shape or not torch.allclose(first, second), "two different inputs encode identically"

    def test_default_projector_takes_the_features(self, host, spec, encoder, valid_files):
        """The modality's default projector (built as the assembler builds it) maps the features to
        exactly the slots the prompt reserves per input (:func:`mmkit.modeling.encoder.tokens_per_input`);
        an encoder that sets ``uses_separators`` marks its separator rows, which get the projector's
        learned separator."""
        import torch

        from mmkit.modeling.components import build_projector
        from mmkit.modeling.encoder import tokens_per_input
        from mmkit.modeling.features import RaggedFeatures

        uses_separators = bool(getattr(encoder, "uses_separators", False))
        torch.manual_seed(0)
        projector = build_projector(host, spec.projector, in_dim=encoder.output_dim, out_dim=8,
                                    num_tokens=encoder.num_tokens, separator=uses_separators)
        items = self._items(spec, encoder, valid_files)
        with _no_grad():
            features = encoder(encoder.collate(items))
            out = projector(features)
        slots = [tokens_per_input(encoder, projector, item) for item in items]
        assert _counts(out) == slots, f"the projector gives {_counts(out)} tokens per input, the prompt reserves {slots}"
        assert _values(out).shape[-1] == 8
        if uses_separators:
            assert isinstance(features, RaggedFeatures) and features.separators is not None, (
                "uses_separators is set but the features mark no separator rows (RaggedFeatures.separators)")
            if isinstance(out, RaggedFeatures) and hasattr(projector, "separator"):
                rows = out.values[features.separators.to(out.values.device)]
                assert torch.equal(rows, projector.separator.detach().expand_as(rows).to(rows.dtype))

    def test_blank_works(self, encoder):
        """``blank(n)``: the batch of the evaluation ablation and of the ZeRO-3 dummy pass encodes into n
        finite inputs."""
        blank = encoder.blank(2)
        with _no_grad():
            out = encoder(blank)
        assert len(_counts(out)) == 2
        if encoder.num_tokens is not None:
            assert tuple(out.shape) == (2, encoder.num_tokens, encoder.output_dim)
        assert bool(_values(out).isfinite().all()), "encoding a blank batch gave NaN or inf"

    def test_blank_input_joins_a_batch(self, spec, encoder, valid_files):
        """The evaluation ablation (``mmkit eval``, the end of ``mmkit train``) puts a blank input in
        place of each file: ``encoder.blank_item()`` (by default a tensor's first row of ``blank(1)``,
        a torch-geometric batch's first graph) is counted with ``num_tokens_for`` and collated beside
        real items."""
        blank = encoder.blank_item()
        items = [blank, *self._items(spec, encoder, valid_files)[:1], blank]
        try:
            counts = [int(encoder.num_tokens_for(item)) for item in items]
            batch = encoder.collate(items)
        except Exception as exc:
            raise AssertionError(
                f"the ablation's blank input ({type(blank).__name__}, from blank_item()) must be accepted by "
                f"num_tokens_for and collate beside real items: "
                f"{type(exc).__name__}: {exc}") from exc
        with _no_grad():
            out = encoder(batch)
        assert _counts(out) == counts, f"encoded {_counts(out)} tokens per input, num_tokens_for said {counts}"

    def test_mixed_precision_forward(self, spec, encoder, valid_files):
        """Parameters in bf16, buffers left in fp32 (as DeepSpeed leaves them), the batch's floating
        leaves in bf16 (integer ones untouched, as mmkit moves batches): the forward runs and stays
        near the fp32 features."""
        import copy

        import torch

        from mmkit.modeling.features import move

        batch = self._batch(spec, encoder, valid_files)
        half = copy.deepcopy(encoder)
        for param in half.parameters():
            if param.is_floating_point():
                param.data = param.data.to(torch.bfloat16)
        with _no_grad():
            reference = _values(encoder(batch)).float()
            try:
                out = half(move(self._batch(spec, encoder, valid_files), "cpu", torch.bfloat16))
            except Exception as exc:
                pytest.fail(f"the forward with bf16 parameters and fp32 buffers failed: {exc}")
        values = _values(out).float()
        assert values.shape == reference.shape
        assert bool(values.isfinite().all()), "bf16 forward gave NaN or inf"
        scale = float(reference.abs().max()) or 1.0
        error = float((values - reference).abs().max()) / scale
        assert error <= self.mixed_precision_tolerance, (
            f"bf16 features differ from fp32 by {error:.3f} of their scale (tolerance {self.mixed_precision_tolerance})")

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
    def _items(spec, encoder, files) -> list:
        from mmkit.specs import resolve

        load = resolve(spec.load)
        return [encoder.preprocess(load(p)) for p in files]

    @classmethod
    def _batch(cls, spec, encoder, files):
        return encoder.collate(cls._items(spec, encoder, files))


def _spread(items: list, limit: int) -> list:
    """A seeded random subset of at most ``limit`` items, in their order."""
    import random

    if len(items) <= limit:
        return items
    keep = sorted(random.Random(0).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def _values(out: Any) -> Any:
    """The feature rows of a fixed ``[B, T, D]`` tensor or of RaggedFeatures."""
    from mmkit.modeling.features import RaggedFeatures

    return out.values if isinstance(out, RaggedFeatures) else out


def _counts(out: Any) -> list[int]:
    from mmkit.modeling.features import RaggedFeatures

    if isinstance(out, RaggedFeatures):
        return [int(c) for c in out.counts]
    return [int(out.shape[1])] * int(out.shape[0])


def _per_input(out: Any) -> list:
    """One ``[n_i, D]`` tensor per input."""
    from mmkit.modeling.features import RaggedFeatures

    return out.split() if isinstance(out, RaggedFeatures) else list(out)


def _tensors(obj: Any) -> list:
    """The tensors inside a preprocessed item (a tensor, a list / tuple / dict of them, or an object with
    ``to_dict()`` such as a torch-geometric ``Data``)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        return _tensors(to_dict())
    return []


def _no_grad():
    import torch

    return torch.no_grad()

"""The public API: ``import mmkit`` gives every name in ``mmkit.__all__`` (lazily, without torch),
and the command line uses nothing else.

The CLI may import from ``mmkit`` only, except that the commands showing the plugin host and the
hook contract (``mmkit plugins ...`` and the entry point, which registers plugins' commands and
names the distribution in ``--version``) may also use ``mmkit.plugins`` and ``mmkit.hookspecs``:
that host and that contract are what they display.
"""

from __future__ import annotations

import ast
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from imports import mmkit_imports

import mmkit

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "cli"
#: modules every CLI file may import from
PUBLIC = {"mmkit"}
#: more modules, by CLI file
EXTRA = {"plugins_cmd.py": {"mmkit.plugins", "mmkit.hookspecs"}, "main.py": {"mmkit.plugins"}}
#: what ``from mmkit import X`` may name besides ``__all__``
FACADE_EXTRAS = {"__version__"}
HEAVY = ("torch", "transformers", "peft", "deepspeed", "safetensors")


def _lazy_table() -> dict[str, str]:
    return dict(vars(mmkit)["_LAZY"])


# -- the names -------------------------------------------------------------------------------------
def test_every_public_name_resolves_and_is_listed():
    assert mmkit.__all__ == sorted(set(mmkit.__all__)), "keep __all__ sorted, without repeats"
    missing = [name for name in mmkit.__all__ if not hasattr(mmkit, name)]
    assert missing == []
    assert set(mmkit.__all__) <= set(dir(mmkit))
    assert set(_lazy_table()) <= set(mmkit.__all__)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        mmkit.no_such_name  # noqa: B018


@pytest.mark.parametrize("name", ["train", "TrainConfig", "validate_data", "evaluate", "load", "get_host", "hookimpl",
                                  "ModalitySpec", "EncoderSpec", "ProjectorSpec", "ReaderSpec", "MetricSpec",
                                  "ExporterSpec", "BenchmarkSpec", "ModalityEncoder", "PretrainedEncoder",
                                  "RaggedFeatures", "Projector", "Sample", "Turn", "ReadContext", "read_records",
                                  "InputError", "MissingFileError", "CorruptFileError", "load_state_strict",
                                  "seeded", "weights_sha256", "export_run", "run_benchmark"])
def test_the_issue_names_are_public(name):
    assert name in mmkit.__all__


def test_lazy_names_are_the_objects_in_their_modules_and_follow_a_replacement(monkeypatch):
    import importlib

    for name, target in _lazy_table().items():
        module, _, attr = target.partition(":")
        assert getattr(mmkit, name) is getattr(importlib.import_module(module), attr), name
    from mmkit.training import recipe

    monkeypatch.setattr(recipe, "train", lambda cfg: "replaced")
    from mmkit import train

    assert train(None) == "replaced"


def test_type_checkers_see_every_lazy_name_from_the_same_place():
    """The ``if TYPE_CHECKING:`` imports in mmkit/__init__.py bind each lazy name to the object
    ``__getattr__`` returns (a type checker reads those, not the table)."""
    tree = ast.parse((ROOT / "mmkit" / "__init__.py").read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING")
    seen = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom)
        for alias in node.names:
            seen[alias.asname or alias.name] = f"{node.module}:{alias.name}"
    assert seen == _lazy_table()


def test_import_mmkit_is_torch_free():
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import mmkit, sys; "
                           "print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % (HEAVY,)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert imported and [m for m in imported if m.split(".")[0] in HEAVY] == []


# -- the typed contract ----------------------------------------------------------------------------
def test_data_error_kinds_are_types_and_survive_pickling():
    err = mmkit.DataError("d.jsonl", 3, "file not found: a.npy", record_id="x", kind="missing_file")
    assert type(err) is mmkit.MissingFileError and err.kind == "missing_file"
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is mmkit.MissingFileError and (again.record_id, str(again)) == ("x", str(err))
    # the subclass sets its own kind; a kind with no type of its own stays a DataError
    assert mmkit.CorruptFileError("d.jsonl", 1, "bad").kind == "corrupt_file"
    assert type(mmkit.DataError("d.jsonl", 1, "long", kind="too_long")) is mmkit.DataError
    assert isinstance(mmkit.MissingInputError("a.npy"), mmkit.InputError)
    assert str(pickle.loads(pickle.dumps(mmkit.MissingInputError("a.npy")))) == "a.npy: file not found"


def test_read_records_serves_a_reader_plugin(tmp_path):
    def read(path, *, context):  # a reader plugin's read(): its own keys, mmkit's record rules
        return mmkit.read_records(path, context, allowed_keys={"sig"})

    spec = mmkit.ModalitySpec(name="sig", data_keys=("sig",), markers=mmkit.MarkerSpec("<sig>"),
                              load=lambda path: path, encoder="sig_enc")
    (tmp_path / "a.npy").write_bytes(b"x")
    rows = [{"id": "r1", "sig": "a.npy", "conversations": [{"from": "human", "value": "<sig> what?"},
                                                           {"from": "gpt", "value": "a tone"}]},
            {"id": "r2", "conversations": [{"from": "human", "value": "hi"}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    skipped = []
    samples = list(read(path, context=mmkit.ReadContext(modalities={"sig": spec}, on_bad_record=skipped.append)))
    assert [s.id for s in samples] == ["r1"] and samples[0].inputs["sig"] == (str(tmp_path / "a.npy"),)
    assert samples[0].turns[-1] == mmkit.Turn("assistant", "a tone")
    assert [(e.record, e.kind) for e in skipped] == [(1, "turn_order")]


def test_builtin_projectors_satisfy_the_projector_protocol():
    torch = pytest.importorskip("torch")
    from mmkit.modeling.projectors import LinearProjector, ResamplerProjector

    linear = LinearProjector(in_dim=4, out_dim=6, num_tokens=3)
    resampler = ResamplerProjector(in_dim=4, out_dim=6, num_tokens=3, num_queries=2)
    assert isinstance(linear, mmkit.Projector) and isinstance(resampler, mmkit.Projector)
    assert linear(torch.zeros(1, 3, 4)).shape == (1, 3, 6) and resampler.num_output_tokens == 2
    assert not isinstance(torch.nn.Linear(4, 6), mmkit.Projector)  # no num_output_tokens


# -- the CLI uses only the public API --------------------------------------------------------------
def cli_problems(filename: str, source: str) -> list[str]:
    allowed = PUBLIC | EXTRA.get(filename, set())
    problems = []
    for line, module, name in mmkit_imports(source):
        if module == "mmkit" and name is not None and name not in mmkit.__all__ and name not in FACADE_EXTRAS:
            module = f"mmkit.{name}"  # ``from mmkit import hookspecs`` imports the submodule
            if module not in allowed:
                problems.append(f"{filename}:{line}: mmkit.{name} is not public (add it to mmkit/__init__.py)")
            continue
        if module not in allowed:
            problems.append(f"{filename}:{line}: imports {module}; use the public names of `mmkit`")
    return problems


def test_cli_imports_only_the_public_api():
    files = sorted(CLI.glob("*.py"))
    assert len(files) >= 8
    assert [p for f in files for p in cli_problems(f.name, f.read_text())] == []


@pytest.mark.parametrize("snippet, expected", [
    ("def f():\n    from mmkit.training.recipe import train\n", "imports mmkit.training.recipe"),
    ("import mmkit.data.validate\n", "imports mmkit.data.validate"),
    ("from mmkit import inference\n", "mmkit.inference is not public"),
    ("if TYPE_CHECKING:\n    from mmkit.plugins import PluginHost\n", "imports mmkit.plugins"),
])
def test_the_cli_check_catches_a_private_import(snippet, expected):
    assert any(expected in p for p in cli_problems("data_cmd.py", snippet))
    assert cli_problems("data_cmd.py", "from mmkit import train, ConfigError, __version__\n") == []


# -- tests stand on their own ---------------------------------------------------------------------
def test_core_tests_import_nothing_from_benchmarks():
    """benchmarks/ holds measurements and drills that use the test kit, not code the tests need."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert not any(p.rstrip("/").split("/")[0] == "benchmarks" for p in config["pythonpath"])
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names
                      if n.split(".")[0] in scripts | {"benchmarks"}]
    assert found == []
    import drill  # the fault-drill kit the tests share

    assert Path(drill.__file__).resolve().parent == ROOT / "tests" / "support"

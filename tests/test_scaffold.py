"""``mmkit.scaffold.create_plugin``: names, the generated tree, and (slow) the generated package
installed and passing its own contract tests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from mmkit.plugins import PluginHost
from mmkit.scaffold import ScaffoldError, create_plugin, derive_names, plan

EXPECTED_FILES = {
    ".gitignore",
    "README.md",
    "pyproject.toml",
    "src/{pkg}/__init__.py",
    "src/{pkg}/plugin.py",
    "src/{pkg}/io.py",
    "src/{pkg}/encoder.py",
    "src/{pkg}/demo.py",
    "tests/test_contract.py",
    "tests/test_plugin.py",
}


@pytest.mark.parametrize(("name", "distribution", "package", "modality", "prefix"), [
    ("mmkit-plugin-demo", "mmkit-plugin-demo", "mmkit_plugin_demo", "demo", "Demo"),
    ("MMKit_Plugin.Sonar-Scan", "mmkit-plugin-sonar-scan", "mmkit_plugin_sonar_scan", "sonar_scan", "SonarScan"),
    ("acme-radar", "acme-radar", "acme_radar", "acme_radar", "AcmeRadar"),
    ("mmkit-plugin-ecg12", "mmkit-plugin-ecg12", "mmkit_plugin_ecg12", "ecg12", "Ecg12"),
])
def test_names_are_derived(name, distribution, package, modality, prefix):
    names = derive_names(name)
    assert (names.distribution, names.package, names.modality, names.class_prefix) == (
        distribution, package, modality, prefix)
    assert names.encoder == f"{modality}_patch"


@pytest.mark.parametrize(("name", "modality", "message"), [
    ("my plugin", None, "not a valid distribution name"),
    ("-oops", None, "not a valid distribution name"),
    ("mmkit-plugin-3d", None, "modality name '3d' .* not valid.*--modality"),
    ("mmkit-plugin-label", None, "'label' is reserved"),
    ("mmkit-plugin-x", "Bad-Name", "modality name 'Bad-Name'"),
])
def test_bad_names_are_refused(name, modality, message):
    with pytest.raises(ScaffoldError, match=message):
        derive_names(name, modality)


def test_modality_override():
    names = derive_names("mmkit-plugin-3d", "pointcloud3d")
    assert (names.package, names.modality) == ("mmkit_plugin_3d", "pointcloud3d")


def test_generated_tree(tmp_path):
    target = create_plugin("mmkit-plugin-demo", tmp_path)
    assert target == tmp_path / "mmkit-plugin-demo"
    files = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    assert files == {f.format(pkg="mmkit_plugin_demo") for f in EXPECTED_FILES}
    for path in target.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert "{{" not in text and "__package__" not in text, path
            if path.suffix == ".py":
                compile(text, str(path), "exec")

    project = tomllib.loads((target / "pyproject.toml").read_text())["project"]
    assert project["name"] == "mmkit-plugin-demo"
    assert project["entry-points"]["mmkit"] == {"demo": "mmkit_plugin_demo.plugin"}
    assert {"mmkit-sdk>=0.1,<0.2", "torch>=2.2", "numpy"} <= set(project["dependencies"])
    assert any(dep.startswith("pytest") for dep in project["optional-dependencies"]["test"])
    contract = (target / "tests" / "test_contract.py").read_text()
    assert "class TestDemoContract(ModalityContract):" in contract and 'modality = "demo"' in contract
    plugin_source = (target / "src" / "mmkit_plugin_demo" / "plugin.py").read_text()
    assert not re.search(r"^\s*(import|from)\s+(torch|numpy)\b", plugin_source, re.M)
    # The walkthrough runs `mmkit train --modalities demo` inside the plugin folder: its default
    # output (runs/demo: weights, feature cache, the demo's base LLM) must not end up in the author's git.
    assert "runs/" in (target / ".gitignore").read_text().splitlines()


def test_the_variable_kind_replaces_the_encoder_and_keeps_the_default_as_it_was(tmp_path):
    names = derive_names("mmkit-plugin-demo")
    fixed, variable = plan(names), plan(names, variable=True)
    assert set(variable) == set(fixed) == {f.format(pkg="mmkit_plugin_demo") for f in EXPECTED_FILES}
    encoder = variable["src/mmkit_plugin_demo/encoder.py"]
    for part in ("num_tokens = None", "def num_tokens_for(", "def collate(", "def blank(", "RaggedFeatures("):
        assert part in encoder and part not in fixed["src/mmkit_plugin_demo/encoder.py"], part
    assert "self.input_shape = (length,)" in fixed["src/mmkit_plugin_demo/encoder.py"]
    assert '"max_tokens": 16' in variable["src/mmkit_plugin_demo/plugin.py"]
    assert "int(rng.integers(64, 513))" in variable["src/mmkit_plugin_demo/demo.py"]
    assert "make_signal(kind, rng))" in fixed["src/mmkit_plugin_demo/demo.py"]
    assert "variable-size (contract 1.1)" in variable["README.md"] and "contract 1.1" not in fixed["README.md"]
    # The README's "next steps" states each kind's forward contract (a variable encoder returns
    # RaggedFeatures, never the fixed [B, num_tokens, output_dim] it used to claim for both).
    assert "`[B, num_tokens, output_dim]`" in fixed["README.md"] and "RaggedFeatures" not in fixed["README.md"]
    assert "`[B, num_tokens, output_dim]`" not in variable["README.md"]
    assert "forward` maps a collated batch to\n   `RaggedFeatures`" in variable["README.md"]
    for rel, text in variable.items():
        assert "{{" not in text, rel
        if rel.endswith(".py"):
            compile(text, rel, "exec")
    target = create_plugin("mmkit-plugin-demo", tmp_path, variable=True)
    assert (target / "src" / "mmkit_plugin_demo" / "encoder.py").read_text() == encoder


def test_generated_variable_plugin_passes_its_own_tests(tmp_path):
    """``mmkit plugin new NAME --variable``: the generated package (seen as installed through its
    entry point) passes its own contract suite, variable-size checks included, with nothing skipped."""
    mmkit = str(Path(sys.executable).with_name("mmkit"))
    made = subprocess.run([mmkit, "plugin", "new", "mmkit-plugin-ragged", "--variable", "--dir", str(tmp_path)],
                          capture_output=True, text=True, env=_clean_env(), timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    target = tmp_path / "mmkit-plugin-ragged"
    env = _installed_on_path(target, tmp_path / "site", "ragged")
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                            "-rA", "tests"], cwd=target, capture_output=True, text=True, env=env, timeout=300)
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout and "skipped" not in tests.stdout
    for check in ("test_collate_of_mixed_sizes", "test_token_counts_as_announced", "test_mixed_precision_forward",
                  "test_demo_features_are_separable", "test_the_token_count_follows_the_signal_length"):
        assert f"PASSED tests/test_{'plugin' if 'signal_length' in check else 'contract'}.py::" in tests.stdout
        assert check in tests.stdout, check


def test_existing_directory_is_refused_and_left_alone(tmp_path):
    existing = tmp_path / "mmkit-plugin-demo"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(ScaffoldError, match="already exists"):
        create_plugin("mmkit-plugin-demo", tmp_path)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_plan_renders_without_writing(tmp_path):
    files = plan(derive_names("mmkit-plugin-demo"))
    assert set(files) == {f.format(pkg="mmkit_plugin_demo") for f in EXPECTED_FILES}
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def generated_on_path(tmp_path, monkeypatch):
    """A generated plugin importable from its ``src`` folder (no install), cleaned from sys.modules."""
    target = create_plugin("mmkit-plugin-fastcheck", tmp_path)
    monkeypatch.syspath_prepend(str(target / "src"))
    yield target
    for name in [m for m in sys.modules if m.split(".")[0] == "mmkit_plugin_fastcheck"]:
        del sys.modules[name]


def test_generated_plugin_registers_cleanly_and_its_demo_builds(generated_on_path, tmp_path):
    import importlib

    from mmkit.records import ReadContext, parse_record
    from mmkit.errors import InputError
    from mmkit.specs import resolve

    host = PluginHost(load_entrypoints=False)
    host.register(importlib.import_module("mmkit_plugin_fastcheck.plugin"), name="fastcheck")
    assert host.check() == []
    spec = host.modality("fastcheck")
    assert host.encoder(spec.encoder).modality == "fastcheck"

    task = resolve(spec.demo.build)(tmp_path / "demo", seed=0)
    assert set(task.answers) == {"sine", "square", "sawtooth", "noise"}
    ctx = ReadContext(modalities=host.modalities(), data_root=tmp_path / "demo", check_files=True)
    sample = parse_record(task.test[0], ctx=ctx, base=tmp_path / "demo", source="demo", index=0)
    signal = resolve(spec.load)(sample.inputs["fastcheck"][0])
    assert signal.ndim == 1 and signal.dtype.name == "float32"

    bad = tmp_path / "bad.npy"
    bad.write_text("not numpy")
    with pytest.raises(InputError, match="bad.npy: not a .npy array"):
        resolve(spec.load)(bad)


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_generated_plugin_installs_and_passes_its_own_tests(tmp_path):
    distribution = "mmkit-plugin-scaffoldcheck"
    env = _clean_env()
    target = create_plugin(distribution, tmp_path)
    _pip("uninstall", "-y", distribution)  # a leftover from an interrupted run
    try:
        installed = _pip("install", "--no-deps", "--no-build-isolation", "-e", str(target))
        assert installed.returncode == 0, installed.stdout + installed.stderr

        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                               cwd=target, capture_output=True, text=True, env=env, timeout=300)
        assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
        assert " passed" in tests.stdout and "skipped" not in tests.stdout

        mmkit = str(Path(sys.executable).with_name("mmkit"))
        listed = subprocess.run([mmkit, "plugins", "list", "--json"], capture_output=True, text=True, env=env)
        assert listed.returncode == 0, listed.stderr
        row = {r["name"]: r for r in json.loads(listed.stdout)}["scaffoldcheck"]
        assert (row["status"], row["distribution"], row["requires_mmkit"]) == ("ok", distribution, "<0.2,>=0.1")
        assert row["registered"]["modalities"] == ["scaffoldcheck"]
        assert row["registered"]["encoders"] == ["scaffoldcheck_patch"]

        checked = subprocess.run([mmkit, "plugins", "check", "--deep"], capture_output=True, text=True,
                                 env={**env, "MMKIT_PLUGINS": "scaffoldcheck"})
        assert checked.returncode == 0, checked.stderr
        assert "all 6 plugins OK" in checked.stdout
    finally:
        _pip("uninstall", "-y", distribution)


# An in-process training test leaves this pytest process's rendezvous variables in os.environ, its store
# still listening on MASTER_PORT: a child `mmkit train` inheriting them would take that port as a
# launcher's and fail to bind it (EADDRINUSE).
_PROCESS_GROUP = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MMKIT_") and k not in _PROCESS_GROUP}


def _installed_on_path(target: Path, site: Path, entry: str) -> dict[str, str]:
    """The environment of a subprocess that sees a generated plugin as installed, without pip: its
    ``src`` on PYTHONPATH and a dist-info folder declaring the ``mmkit`` entry point."""
    package = target.name.replace("-", "_")
    info = site / f"{package}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {target.name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[mmkit]\n{entry} = {package}.plugin\n")
    env = _clean_env()
    return {**env, "PYTHONPATH": os.pathsep.join([str(site), str(target / "src")]), "MMKIT_PLUGINS": entry,
            "MMKIT_CACHE": str(site.parent / "cache"), "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_scaffold_trains_on_own_data_offline_skips_a_bad_record_and_reloads(tmp_path):
    """Acceptance of the plugin-author issue: a scaffolded plugin whose ``preprocess`` raises on one
    record trains on the author's own data with ``--llm tiny`` (offline) and ``--skip-bad-records``,
    the record named in ``skipped.jsonl``; without the flag the error names plugin, record and file in
    one line; the trained run reloads (random-init encoder seeded) and answers in ``mmkit chat``."""
    target = create_plugin("mmkit-plugin-sonar", tmp_path)
    encoder_py = target / "src" / "mmkit_plugin_sonar" / "encoder.py"
    source = encoder_py.read_text()
    anchor = "        signal = np.asarray(raw, dtype=np.float64)\n"
    assert anchor in source
    encoder_py.write_text(source.replace(anchor, anchor + "        if np.abs(signal).max() > 1e3:\n"
                                         "            raise ValueError('amplitude above 1000: not a sonar return')\n"))
    env = _installed_on_path(target, tmp_path / "site", "sonar")

    data = tmp_path / "own"
    (data / "sig").mkdir(parents=True)
    t = np.linspace(0, 1, 200)
    records = []
    for i in range(8):
        kind = ("sine", "square")[i % 2]
        wave = np.sin(2 * np.pi * (3 + i) * t)
        np.save(data / "sig" / f"{i}.npy", (wave if kind == "sine" else np.sign(wave)).astype(np.float32))
        records.append({"id": f"r{i}", "sonar": f"sig/{i}.npy", "conversations": [
            {"from": "human", "value": "<sonar>\nWhich waveform is this?"}, {"from": "gpt", "value": kind}]})
    np.save(data / "sig" / "loud.npy", (1e6 * np.sin(t)).astype(np.float32))
    records.insert(3, {"id": "loud", "sonar": "sig/loud.npy", "conversations": [
        {"from": "human", "value": "<sonar>\nWhich waveform is this?"}, {"from": "gpt", "value": "sine"}]})
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    mmkit = str(Path(sys.executable).with_name("mmkit"))
    train = [mmkit, "train", "--llm", "tiny", "--modalities", "sonar", "--data", str(data / "train.jsonl"),
             "--max-steps", "2", "--micro-batch-size", "4"]
    run = tmp_path / "run"
    ok = subprocess.run([*train, "--output-dir", str(run), "--skip-bad-records"], capture_output=True, text=True,
                        env=env, timeout=600)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    skipped = [json.loads(line) for line in (run / "skipped.jsonl").read_text().splitlines()]
    assert [s["record"] for s in skipped] == [f"{data / 'train.jsonl'} record 3 (id loud)"]
    assert "plugin sonar, modality sonar: preprocess raised ValueError: amplitude above 1000" in skipped[0]["reason"]
    assert str(data / "sig" / "loud.npy") in skipped[0]["reason"]
    assert "unknown token" not in ok.stdout  # --llm tiny's byte-level tokenizer spells any answer

    failed = subprocess.run([*train, "--output-dir", str(tmp_path / "strict")], capture_output=True, text=True,
                            env=env, timeout=600)
    assert failed.returncode == 1
    error = [line for line in (failed.stdout + failed.stderr).splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    for part in ("record 3 (id loud)", "sig/loud.npy", "plugin sonar", "ValueError: amplitude above 1000"):
        assert part in error[0], (part, error[0])

    chat = subprocess.run([mmkit, "chat", str(run), "--sonar", str(data / "sig" / "0.npy"), "--max-new-tokens", "2",
                           "Which waveform is this?"], capture_output=True, text=True, env=env, timeout=600)
    assert chat.returncode == 0, chat.stdout[-3000:] + chat.stderr[-3000:]
    assert chat.stdout.strip()

    # The walkthrough's eval step with a mistyped --data file: one error line naming it, exit 1,
    # before the model loads and without leaving an empty RUN/eval/<name>/ (was a raw FileNotFoundError).
    missing = subprocess.run([mmkit, "eval", "run", str(run), "--data", str(data / "tset.jsonl")],
                             capture_output=True, text=True, env=env, timeout=600)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr, missing.stderr[-3000:]
    assert f"error: {data / 'tset.jsonl'}: file not found" in missing.stdout + missing.stderr
    assert not (run / "eval" / "tset").exists()


def test_reading_a_missing_data_file_is_a_missing_file_error(tmp_path):
    """``mmkit.evaluate`` (or any caller of the readers) on a data file that is not there: a
    ``MissingFileError`` naming it, not the reader's raw ``FileNotFoundError``."""
    from mmkit import MissingFileError, get_host
    from mmkit.data.readers import ReadContext
    from mmkit.data.sources import iter_samples

    with pytest.raises(MissingFileError, match="file not found"):
        list(iter_samples(get_host(), tmp_path / "nosuch.jsonl", ReadContext(modalities={})))

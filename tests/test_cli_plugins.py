"""``mmkit plugins list|hooks|check`` and ``mmkit plugin new``, in-process and as the real command."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mmkit import MetricSpec, hookimpl, hookspecs
from mmkit_cli.plugins_cmd import plugin_app, plugins_app, render_hook_reference

MMKIT = Path(sys.executable).with_name("mmkit")  # the console script installed with mmkit
DEFAULTS = {"projectors", "lora_targets", "readers", "metrics", "exporters"}
HOOK_NAMES = [n for n, f in vars(hookspecs).items() if inspect.isfunction(f) and hasattr(f, "mmkit_spec")]


def run_mmkit(*args: str, pythonpath: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MMKIT_")}
    environ.update(COLUMNS="200", **env)
    if pythonpath is not None:
        environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), environ.get("PYTHONPATH")]))
    return subprocess.run([str(MMKIT), *args], capture_output=True, text=True, env=environ, timeout=120)


@pytest.fixture
def cli(monkeypatch):
    """Invoke the plugins commands in-process, wired as cli/main.py wires them."""
    monkeypatch.setenv("COLUMNS", "200")
    app = typer.Typer()
    app.add_typer(plugins_app, name="plugins")
    app.add_typer(plugin_app, name="plugin")
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


class GoodPlugin:
    @hookimpl
    def mmkit_metrics(self):
        return [MetricSpec(name="good_metric", compute="mmkit.evaluation.metrics:accuracy")]


class LazyPlugin:
    @hookimpl
    def mmkit_metrics(self):
        return [MetricSpec(name="ghost", compute="mmkit_no_such_module:compute")]


class NoHooks:
    def mmkit_metrics(self):  # forgot @hookimpl: pluggy silently ignores it
        return []


# -- plugins list ------------------------------------------------------------------------------------
def test_list_json_lists_every_installed_plugin():
    result = run_mmkit("plugins", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    by_name = {row["name"]: row for row in rows}
    installed = {ep.name for ep in importlib.metadata.entry_points(group="mmkit")}
    assert DEFAULTS | installed <= set(by_name)
    assert by_name["projectors"]["registered"]["projectors"] == ["linear", "mlp", "resampler"]
    assert by_name["projectors"]["distribution"] == "mmkit-sdk" and by_name["projectors"]["source"] == "default"
    for row in rows:
        assert set(row) >= {"name", "distribution", "version", "source", "status", "error", "import_ms", "hooks",
                            "requires_mmkit", "registered"}
        assert set(row["registered"]) == {"modalities", "encoders", "projectors", "readers", "metrics", "exporters",
                                          "benchmarks"}


def test_list_shows_a_broken_plugin_as_failed_and_still_succeeds(cli, fake_entry_points):
    fake_entry_points.install(fake_entry_points.ep("bad", RuntimeError("boom"), dist="mmkit-plugin-bad"),
                              fake_entry_points.ep("good", GoodPlugin()))
    result = cli("plugins", "list", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert rows["bad"]["status"] == "failed"
    assert rows["bad"]["error"] == "import failed: RuntimeError: boom"
    assert rows["bad"]["distribution"] == "mmkit-plugin-bad"
    assert rows["good"]["status"] == "ok" and rows["good"]["registered"]["metrics"] == ["good_metric"]

    table = cli("plugins", "list")
    assert table.exit_code == 0, table.output
    assert "failed" in table.output
    assert "bad (mmkit-plugin-bad): import failed: RuntimeError: boom" in table.output
    assert "metrics: good_metric" in table.output


def test_list_shows_registration_failures(cli, fake_entry_points):
    class Raises:
        @hookimpl
        def mmkit_metrics(self):
            raise ValueError("bad config")

    fake_entry_points.install(fake_entry_points.ep("raises", Raises()))
    rows = {row["name"]: row for row in json.loads(cli("plugins", "list", "--json").output)}
    assert rows["raises"]["status"] == "failed"
    assert rows["raises"]["error"] == "mmkit_metrics failed: ValueError: bad config"


# -- plugins check -----------------------------------------------------------------------------------
def test_check_with_a_real_broken_distribution(make_distribution):
    site = make_distribution("broken", 'raise RuntimeError("needs libfoo")\n')
    make_distribution("fine", """
        from mmkit import MetricSpec, hookimpl

        @hookimpl
        def mmkit_metrics():
            return [MetricSpec(name="fine_metric", compute="mmkit.evaluation.metrics:accuracy")]
    """)
    listed = run_mmkit("plugins", "list", pythonpath=site)
    assert listed.returncode == 0, listed.stderr
    assert "broken (mmkit-plugin-broken): import failed: RuntimeError: needs libfoo" in listed.stdout

    checked = run_mmkit("plugins", "check", pythonpath=site)
    assert checked.returncode == 1
    assert "broken (mmkit-plugin-broken): import failed: RuntimeError: needs libfoo" in checked.stderr
    assert "Traceback" not in checked.stderr

    only_fine = run_mmkit("plugins", "check", pythonpath=site, MMKIT_PLUGINS="fine")
    assert only_fine.returncode == 0, only_fine.stderr
    assert only_fine.stdout.strip() == f"all {len(DEFAULTS) + 1} plugins OK"


def test_check_deep_resolves_lazy_references(cli, fake_entry_points):
    fake_entry_points.install(fake_entry_points.ep("lazy", LazyPlugin()))
    shallow = cli("plugins", "check")
    assert shallow.exit_code == 0, shallow.output
    assert "all 6 plugins OK" in shallow.output
    deep = cli("plugins", "check", "--deep")
    assert deep.exit_code == 1
    assert "lazy (mmkit-plugin-lazy): metric 'ghost'.compute -> 'mmkit_no_such_module:compute'" in deep.output


def test_check_reports_each_kind_of_problem(cli, fake_entry_points):
    class Misspelled:
        @hookimpl
        def mmkit_metric(self):
            return []

    class Old:
        @hookimpl
        def mmkit_metrics(self):
            return [MetricSpec(name="old_metric", compute="mmkit.evaluation.metrics:accuracy")]

    class Duplicate:
        @hookimpl
        def mmkit_metrics(self):
            return [MetricSpec(name="good_metric", compute="mmkit.evaluation.metrics:accuracy")]

    fake_entry_points.install(
        fake_entry_points.ep("good", GoodPlugin()),
        fake_entry_points.ep("typo", Misspelled()),
        fake_entry_points.ep("dup", Duplicate(), dist="acme-dup"),
        fake_entry_points.ep("old", Old(), requires=["mmkit<0.1"]),
        fake_entry_points.ep("hookless", NoHooks()),
    )
    result = cli("plugins", "check")
    assert result.exit_code == 1
    out = result.output
    assert "4 problem(s) in 10 plugins" in out
    assert "typo (mmkit-plugin-typo): unknown hook 'mmkit_metric' (did you mean 'mmkit_metrics'?)" in out
    assert ("dup (acme-dup): duplicate metric 'good_metric': registered by plugin 'good' and by plugin 'dup'"
            in out)
    assert "old (mmkit-plugin-old): requires mmkit<0.1, this is mmkit 0.1.0" in out
    assert "hookless (mmkit-plugin-hookless): implements no hooks" in out
    assert not [line for line in out.splitlines() if line.startswith("  - good")]


def test_check_under_strict_mode_fails_loudly(cli, fake_entry_points, monkeypatch):
    from mmkit.errors import PluginError

    fake_entry_points.install(fake_entry_points.ep("bad", RuntimeError("boom")))
    monkeypatch.setenv("MMKIT_PLUGINS_STRICT", "1")
    result = cli("plugins", "check")
    assert result.exit_code == 1
    assert isinstance(result.exception, PluginError)  # cli/main.py prints it as "error: ..."
    assert "plugin 'bad' (mmkit-plugin-bad)" in str(result.exception)


# -- plugins hooks -----------------------------------------------------------------------------------
def test_hooks_lists_every_spec(cli):
    result = cli("plugins", "hooks")
    assert result.exit_code == 0, result.output
    for name in HOOK_NAMES:
        assert f"{name}(" in result.output
    specs = json.loads(cli("plugins", "hooks", "--json").output)
    assert [s["name"] for s in specs] == HOOK_NAMES
    assert {s["name"] for s in specs if s["firstresult"]} == {"mmkit_lora_targets"}
    by_name = {s["name"]: s for s in specs}
    assert by_name["mmkit_lora_targets"]["signature"] == (
        "mmkit_lora_targets(model_type: str, module_names: Sequence[str]) -> Sequence[str] | None")
    assert by_name["mmkit_commands"]["doc"] == inspect.getdoc(hookspecs.mmkit_commands)
    assert cli("plugins", "hooks", "--markdown").output == render_hook_reference()


# -- plugin new --------------------------------------------------------------------------------------
def test_plugin_new_creates_the_package_and_refuses_to_overwrite(cli, tmp_path):
    result = cli("plugin", "new", "mmkit-plugin-sonar", "--dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    target = tmp_path / "mmkit-plugin-sonar"
    assert f"created {target}" in result.output
    assert (target / "src" / "mmkit_plugin_sonar" / "plugin.py").is_file()
    marker = target / "README.md"
    before = marker.read_text()

    again = run_mmkit("plugin", "new", "mmkit-plugin-sonar", "--dir", str(tmp_path))
    assert again.returncode == 1
    assert f"error: {target} already exists" in again.stderr
    assert "Traceback" not in again.stderr
    assert marker.read_text() == before


def test_plugin_new_with_an_explicit_modality(cli, tmp_path):
    result = cli("plugin", "new", "acme-scope", "--dir", str(tmp_path), "--modality", "scope_trace")
    assert result.exit_code == 0, result.output
    pyproject = (tmp_path / "acme-scope" / "pyproject.toml").read_text()
    assert 'scope_trace = "acme_scope.plugin"' in pyproject


# -- start-up cost -----------------------------------------------------------------------------------
def test_cli_start_up_imports_no_torch():
    # The real guard for a fast CLI: registering every command (which loads every installed plugin)
    # must not import torch or transformers.
    code = ("import json, sys, mmkit_cli.main; mmkit_cli.main._register_commands(); "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MMKIT_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=environ)
    assert json.loads(out.stdout) == []


def test_usage_errors_are_reported_without_a_traceback():
    result = run_mmkit("plugin", "new")
    assert result.returncode == 2
    assert "Missing" in result.stderr and "Traceback" not in result.stderr

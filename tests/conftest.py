"""Shared fixtures. Tests build their own hosts; nothing here depends on which plugins are installed."""

from __future__ import annotations

import importlib.metadata
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from mmkit.plugins import ENTRY_POINT_GROUP, PluginHost, set_host

_ENV_SWITCHES = ("MMKIT_PLUGINS", "MMKIT_BLOCK_PLUGINS", "MMKIT_PLUGINS_STRICT", "MMKIT_TRACE_HOOKS")


@pytest.fixture(autouse=True)
def _isolated_plugin_state(monkeypatch: pytest.MonkeyPatch):
    """No plugin env switch leaks in from the caller's shell, and no process-wide host leaks out."""
    for name in _ENV_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    set_host(None)
    yield
    set_host(None)


@pytest.fixture
def host() -> PluginHost:
    """A host with only mmkit's default plugins; register test plugins with ``host.register``."""
    return PluginHost(load_entrypoints=False)


class FakeDist:
    """The parts of ``importlib.metadata.Distribution`` the host reads."""

    def __init__(self, name: str, version: str = "1.0", requires: Iterable[str] = ()):
        self.metadata = {"Name": name}
        self.version = version
        self.requires = list(requires)


class FakeEntryPoint:
    """An ``mmkit`` entry point whose ``load()`` returns ``plugin`` (or raises it, if an exception)."""

    group = ENTRY_POINT_GROUP

    def __init__(self, name: str, plugin: Any, dist: FakeDist | None = None):
        self.name = name
        self.value = f"fake_{name}"
        self.dist = dist if dist is not None else FakeDist(f"mmkit-plugin-{name}")
        self._plugin = plugin
        self.loads = 0

    def load(self) -> Any:
        self.loads += 1
        if isinstance(self._plugin, BaseException):
            raise self._plugin
        return self._plugin


class EntryPointFaker:
    """Makes ``importlib.metadata.entry_points(group="mmkit")`` return chosen fake entry points."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self._monkeypatch = monkeypatch

    @staticmethod
    def ep(name: str, plugin: Any, *, dist: str | None = None, version: str = "1.0",
           requires: Iterable[str] = ()) -> FakeEntryPoint:
        return FakeEntryPoint(name, plugin, FakeDist(dist or f"mmkit-plugin-{name}", version, requires))

    def install(self, *eps: FakeEntryPoint) -> list[FakeEntryPoint]:
        real = importlib.metadata.entry_points

        def entry_points(**params: Any) -> Any:
            if params.get("group") == ENTRY_POINT_GROUP:
                return list(eps)
            return real(**params)

        self._monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
        return list(eps)


@pytest.fixture
def fake_entry_points(monkeypatch: pytest.MonkeyPatch) -> EntryPointFaker:
    """``fake_entry_points.install(fake_entry_points.ep("x", plugin), ...)``: the ``mmkit`` group
    then holds exactly those entry points (the plugin may be an exception, raised on load)."""
    return EntryPointFaker(monkeypatch)


@pytest.fixture
def make_distribution(tmp_path: Path) -> Callable[..., Path]:
    """Write a real installed distribution (package + ``.dist-info``) under a folder to put on
    ``sys.path`` / ``PYTHONPATH``; returns that folder. ``code`` is the plugin module's source."""
    site = tmp_path / "site"

    def make(name: str, code: str, *, version: str = "0.1", requires: Iterable[str] = ("mmkit>=0.1,<0.2",)) -> Path:
        package = f"mmkit_plugin_{name}"
        (site / package).mkdir(parents=True)
        (site / package / "__init__.py").write_text(textwrap.dedent(code))
        info = site / f"{package}-{version}.dist-info"
        info.mkdir()
        lines = ["Metadata-Version: 2.1", f"Name: mmkit-plugin-{name}", f"Version: {version}"]
        lines += [f"Requires-Dist: {req}" for req in requires]
        (info / "METADATA").write_text("\n".join(lines) + "\n")
        (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{name} = {package}\n")
        return site

    return make

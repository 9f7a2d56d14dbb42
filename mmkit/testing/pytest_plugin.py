"""pytest plugin (entry point ``pytest11``): fixtures for plugin authors. Light at import time."""

from __future__ import annotations

import tempfile

import pytest

_DEFAULT_BENCHMARK_STORAGE = "file://./.benchmarks"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """pytest-benchmark creates ``./.benchmarks`` at start-up even when nothing is saved: point its
    storage at a temporary folder unless the user asked to save or compare results."""
    option = config.option
    keeps = any(getattr(option, name, None) for name in ("benchmark_save", "benchmark_autosave", "benchmark_compare",
                                                         "benchmark_compare_fail"))
    if getattr(option, "benchmark_storage", None) == _DEFAULT_BENCHMARK_STORAGE and not keeps:
        option.benchmark_storage = "file://" + tempfile.mkdtemp(prefix="mmkit-benchmarks-")


@pytest.fixture
def mmkit_host():
    """A fresh plugin host with every installed plugin loaded."""
    from mmkit.plugins import PluginHost

    return PluginHost()

"""pytest plugin (entry point ``pytest11``): fixtures for plugin authors. Light at import time."""

from __future__ import annotations

import pytest


@pytest.fixture
def mmkit_host():
    """A fresh plugin host with every installed plugin loaded."""
    from mmkit.plugins import PluginHost

    return PluginHost()

"""docs/plugins.md stays in step with the code: hook specs, env switches, commands."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import mmkit.plugins
from mmkit import hookspecs
from mmkit_cli.plugins_cmd import HOOK_REFERENCE_TITLE, plugin_app, plugins_app, render_hook_reference

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
SPECS = {name: f for name, f in vars(hookspecs).items() if inspect.isfunction(f) and hasattr(f, "mmkit_spec")}
# `mmkit_*` words in the docs that are not hooks: plugin packages, the pytest fixture.
NOT_HOOKS = re.compile(r"^mmkit_(plugin_\w+|host|cli)$")


@pytest.fixture(scope="module")
def docs() -> str:
    return DOCS.read_text()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_hook_is_documented_with_its_exact_signature(docs, name):
    # inspect renders hookspecs' string annotations in quotes; the docs show them as written.
    signature = name + str(inspect.signature(SPECS[name])).replace("'", "")
    assert f"### `{name}`" in docs
    assert signature in docs


def test_docs_mention_no_hook_that_does_not_exist(docs):
    mentioned = set(re.findall(r"\bmmkit_\w+", docs))
    assert sorted(w for w in mentioned if w not in SPECS and not NOT_HOOKS.match(w)) == []


def test_hook_reference_section_is_the_generated_one(docs):
    # Regenerate with: mmkit plugins hooks --markdown (the section is the last one of the page).
    assert docs.count(HOOK_REFERENCE_TITLE + "\n") == 1
    section = docs[docs.index(HOOK_REFERENCE_TITLE + "\n"):]
    assert section == render_hook_reference()


def test_env_switches_are_documented(docs):
    switches = set(re.findall(r"MMKIT_[A-Z_]+", mmkit.plugins.__doc__ or ""))
    assert len(switches) >= 4
    for switch in switches:
        assert f"`{switch}" in docs, switch


def test_cli_commands_are_documented(docs):
    for group, app in (("plugins", plugins_app), ("plugin", plugin_app)):
        for command in app.registered_commands:
            assert f"`mmkit {group} {command.name}" in docs, command.name

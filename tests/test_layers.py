"""The package's layers point one way: a module never imports from a layer above its own, not even
inside a function (a function-local import hides the edge, it does not remove it).

    base (errors <- specs, atomic, io, ... <- hookspecs, records <- plugins <- demo, ...) <- prompt
    <- modeling <- data
    <- inference / testing <- evaluation / export <- training <- bench

Sibling packages of one layer do not import each other. The cli sits above all of them and goes
through the public API (see test_public_api.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from imports import mmkit_imports

PACKAGE = Path(__file__).resolve().parents[1] / "mmkit"

#: rank of each top-level module or subpackage of ``mmkit``; a module may import only lower ranks
#: (or its own package)
LAYERS: dict[str, int] = {
    # the base, itself ordered: errors <- descriptors and helpers <- the contract <- the host <- its users
    "errors": 0,
    **dict.fromkeys(["specs", "atomic", "io", "cache", "templates", "generation"], 1),
    **dict.fromkeys(["hookspecs", "records"], 2),
    "plugins": 3,
    **dict.fromkeys(["demo", "default_plugins", "scaffold"], 4),
    "prompt": 10,
    "modeling": 20,
    "data": 30,
    **dict.fromkeys(["inference", "testing"], 40),
    **dict.fromkeys(["evaluation", "export"], 50),
    "training": 60,
    "bench": 70,
}
#: what base modules may take from the package's ``__init__`` (defined there, import nothing)
FACADE_BASICS = {"__version__", "hookimpl"}


def _unit(module: str) -> str:
    """``mmkit.data.batching`` -> ``data``; ``mmkit`` -> ``""`` (the public facade)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def problems_in(path: Path, source: str) -> list[str]:
    """The imports of file ``path`` (module ``source``) that point up or sideways."""
    unit = _unit(source)
    if unit == "":  # the facade imports its API lazily, from every layer: that is its job
        return []
    where, rank, problems = path.name if not path.is_relative_to(PACKAGE.parent) else \
        path.relative_to(PACKAGE.parent), LAYERS[unit], []
    for line, target, name in sorted(set(mmkit_imports(path.read_text(), str(path)))):
        if target == "mmkit" and name is not None:
            if (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file():
                target = f"mmkit.{name}"
            elif name in FACADE_BASICS:
                continue
            else:
                problems.append(f"{where}:{line}: imports mmkit.{name} from the public facade; import it from "
                                "its module")
                continue
        other = _unit(target)
        if other == unit:
            continue
        if other not in LAYERS:
            problems.append(f"{where}:{line}: {target} has no layer in LAYERS")
        elif LAYERS[other] >= rank:
            problems.append(f"{where}:{line}: {unit} (layer {rank}) imports {target} (layer {LAYERS[other]})")
    return problems


def backward_edges() -> list[str]:
    return [p for path in sorted(PACKAGE.rglob("*.py")) for p in problems_in(path, _module_of(path))]


def test_every_module_has_a_layer():
    units = {_unit(_module_of(p)) for p in PACKAGE.rglob("*.py")} - {""}
    assert units <= set(LAYERS), f"give these a layer in LAYERS: {sorted(units - set(LAYERS))}"


def test_no_import_points_up_or_sideways():
    assert backward_edges() == []


@pytest.mark.parametrize("snippet, expected", [
    ("from mmkit.training.distributed import device\n", "modeling (layer 20) imports mmkit.training.distributed"),
    ("def f():\n    from mmkit.data.packing import packed_attention_mask\n", "imports mmkit.data.packing"),
    ("import mmkit.evaluation.metrics\n", "imports mmkit.evaluation.metrics"),
    ("from mmkit import train\n", "from the public facade"),
])
def test_the_check_catches_a_backward_import(snippet, expected, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(snippet)
    problems = problems_in(probe, "mmkit.modeling.probe")
    assert any(expected in p for p in problems), problems

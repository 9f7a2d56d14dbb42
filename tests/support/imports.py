"""The mmkit imports of a source file, for the tests that hold imports to rules (test_layers,
test_public_api)."""

from __future__ import annotations

import ast


def mmkit_imports(source: str, filename: str = "<source>") -> list[tuple[int, str, str | None]]:
    """``(line, module, imported name)`` of every mmkit import anywhere in ``source``:
    function-local and ``TYPE_CHECKING`` ones included (a hidden import is still an edge)."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "mmkit"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "mmkit":
            found += [(node.lineno, node.module, a.name) for a in node.names]
    return found

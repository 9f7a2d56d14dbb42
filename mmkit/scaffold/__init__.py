"""``mmkit plugin new``: generate a complete, working modality plugin package.

The template lives in ``template/`` next to this file. Every file there ends in ``.tmpl`` (so
neither pytest nor setuptools mistakes it for code) and may contain ``{{key}}`` placeholders; the
directory ``__package__`` becomes the import package. No templating dependency: placeholders are
replaced by a strict regex pass that fails on any unknown key.

Two kinds of plugin come out of it (contract 1.1): the default, a fixed-size encoder (every input
resampled to one shape, a fixed token count), and with ``variable=True`` (``mmkit plugin new NAME
--variable``) a variable-size one (the token count follows the input's length). A template file
``X.variable.tmpl`` replaces ``X.tmpl`` in the variable kind and is left out of the default; the
values in :data:`KIND_VALUES` fill the few lines that differ inside shared files.
"""

from __future__ import annotations

import keyword
import re
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import attrs

from mmkit.errors import MmkitError

TEMPLATE_SUFFIX = ".tmpl"
VARIANT_SUFFIX = ".variable.tmpl"
#: Placeholder values that differ between the fixed-size (default) and the variable-size kind.
KIND_VALUES: dict[bool, dict[str, str]] = {
    False: {
        "encoder_tiny": '{"length": 256, "patch_size": 32, "hidden_size": 32, "num_layers": 1}',
        "demo_encoder_options": '{"length": 256}',
        "encoder_description": "patch embedding + residual MLP blocks over a resampled signal",
        "demo_length_arg": "",
        "separability_threshold": "0.6",
        "probe_measured": "0.79",
        "variable_note": "",
        "forward_contract": "`[B, *input_shape]` to\n   `[B, num_tokens, output_dim]`",
    },
    True: {
        "encoder_tiny": '{"patch_size": 32, "max_tokens": 16, "hidden_size": 32, "num_layers": 1}',
        "demo_encoder_options": '{"max_tokens": 16}',
        "encoder_description": "one token per patch of a signal of any length (a variable token count)",
        "demo_length_arg": ", int(rng.integers(64, 513))",  # 2 to 16 patches of 32: token counts differ per input
        "separability_threshold": "0.6",
        "probe_measured": "0.75",
        "variable_note": (" This encoder is variable-size (contract 1.1): `num_tokens = None`, `num_tokens_for(item)`"
                          " gives each input's token count before encoding, `collate` pads a batch and `forward`"
                          " returns `RaggedFeatures`; see mmkit's docs/plugins.md, \"Fixed and variable inputs\"."),
        "forward_contract": "a collated batch to\n   `RaggedFeatures` (`[n_i, output_dim]` rows per input, `n_i = num_tokens_for(item_i)`)",
    },
}
PACKAGE_DIR = "__package__"
PREFIX = "mmkit-plugin-"
# Template names that cannot be stored under their real name (a dotfile may be dropped from a wheel).
_RENAMES = {"gitignore": ".gitignore"}
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_DISTRIBUTION = re.compile(r"^[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?$")
_MODALITY = re.compile(r"^[a-z][a-z0-9_]*$")
# Record keys the generic reader reserves; a modality's data key must not be one of them.
_RESERVED_KEYS = {"id", "conversations", "messages", "system", "task_type", "src_image", "src_dataset",
                  "src_id", "label", "answers", "meta"}


class ScaffoldError(MmkitError):
    """A plugin cannot be generated (bad name, destination exists)."""


@attrs.frozen
class PluginNames:
    """The names a plugin goes by, all derived from the one the user typed."""

    distribution: str  # on PyPI / pip: mmkit-plugin-demo
    package: str  # import package: mmkit_plugin_demo
    modality: str  # entry-point name, modality name and record key: demo
    class_prefix: str  # Python class names: Demo -> DemoEncoder
    encoder: str  # registered encoder name: demo_patch

    def as_mapping(self) -> dict[str, str]:
        from mmkit import __version__

        major, minor = (int(part) for part in __version__.split(".")[:2])
        return {
            "distribution": self.distribution,
            "package": self.package,
            "modality": self.modality,
            "Modality": self.class_prefix,
            "encoder": self.encoder,
            # The hook API is versioned with mmkit's minor release while mmkit is 0.x.
            # mmkit is published as mmkit-sdk (the name mmkit on the package index is another project).
            "mmkit_requirement": f"mmkit-sdk>={major}.{minor},<{major}.{minor + 1}",
        }


def derive_names(name: str, modality: str | None = None) -> PluginNames:
    """``mmkit-plugin-demo`` -> distribution ``mmkit-plugin-demo``, package ``mmkit_plugin_demo``,
    modality ``demo``. ``modality`` overrides the derived modality name."""
    distribution = re.sub(r"[-_.]+", "-", name.strip().lower())
    if not _DISTRIBUTION.match(distribution):
        raise ScaffoldError(f"{name!r} is not a valid distribution name: use letters, digits and '-', "
                            "e.g. 'mmkit-plugin-sonar'")
    package = distribution.replace("-", "_").replace(".", "_")
    if not package.isidentifier() or keyword.iskeyword(package):
        raise ScaffoldError(f"{name!r} gives the import package {package!r}, which is not a valid Python name")
    if modality is None:
        stem = distribution.removeprefix(PREFIX)
        modality = re.sub(r"_+", "_", re.sub(r"[^a-z0-9]", "_", stem)).strip("_")
        hint = " (pass --modality NAME)"
    else:
        hint = ""
    if not _MODALITY.match(modality):
        raise ScaffoldError(f"modality name {modality!r} derived from {name!r} is not valid: use lower-case letters, "
                            f"digits and underscores, starting with a letter{hint}")
    if modality in _RESERVED_KEYS or keyword.iskeyword(modality):
        raise ScaffoldError(f"modality name {modality!r} is reserved; choose another{hint}")
    class_prefix = "".join(part.capitalize() for part in modality.split("_"))
    return PluginNames(distribution=distribution, package=package, modality=modality,
                       class_prefix=class_prefix, encoder=f"{modality}_patch")


def render(text: str, values: dict[str, str], *, source: str = "<template>") -> str:
    """Replace every ``{{key}}``; an unknown key is a bug in the template, so it raises."""

    def substitute(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"{source}: unknown template placeholder {{{{{key}}}}}")
        return values[key]

    return _PLACEHOLDER.sub(substitute, text)


def template_root() -> Traversable:
    return resources.files(__name__).joinpath("template")


def _walk(node: Traversable, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Traversable]]:
    found = []
    for child in sorted(node.iterdir(), key=lambda c: c.name):
        if child.name == "__pycache__":
            continue
        if child.is_dir():
            found += _walk(child, (*prefix, child.name))
        elif child.name.endswith(TEMPLATE_SUFFIX):
            found.append(((*prefix, child.name), child))
    return found


def plan(names: PluginNames, *, variable: bool = False) -> dict[str, str]:
    """The files to write: relative path -> rendered content. ``variable``: the variable-size kind."""
    values = {**names.as_mapping(), **KIND_VALUES[variable]}
    files: dict[str, str] = {}
    chosen: dict[str, tuple[tuple[str, ...], Traversable]] = {}
    for parts, node in _walk(template_root()):
        is_variant = parts[-1].endswith(VARIANT_SUFFIX)
        if is_variant and not variable:
            continue
        leaf = parts[-1].removesuffix(VARIANT_SUFFIX if is_variant else TEMPLATE_SUFFIX)
        key = "/".join((*parts[:-1], leaf))
        if is_variant or key not in chosen:  # a variant replaces the shared file, in either walk order
            chosen[key] = (parts, node)
    for key, (parts, node) in chosen.items():
        rel_parts = [names.package if part == PACKAGE_DIR else render(part, values) for part in key.split("/")]
        rel_parts[-1] = _RENAMES.get(rel_parts[-1], rel_parts[-1])
        rel = "/".join(rel_parts)
        files[rel] = render(node.read_text(encoding="utf-8"), values, source="/".join(parts))
    return files


def create_plugin(name: str, dest: str | Path | None = None, *, modality: str | None = None,
                  variable: bool = False) -> Path:
    """Generate the plugin package ``name`` into ``dest / <distribution>`` and return that folder.
    ``variable``: a variable-size encoder (token count per input) instead of a fixed-size one.

    Refuses to touch an existing folder: scaffolding never overwrites work.
    """
    names = derive_names(name, modality)
    parent = Path(dest) if dest is not None else Path.cwd()
    target = parent / names.distribution
    if target.exists():
        raise ScaffoldError(f"{target} already exists; choose another name or --dir, or remove it first")
    files = plan(names, variable=variable)  # render everything before writing anything
    if parent.exists() and not parent.is_dir():
        raise ScaffoldError(f"{parent} is not a directory")
    target.mkdir(parents=True)
    for rel, content in files.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    return target


__all__ = ["KIND_VALUES", "PluginNames", "ScaffoldError", "create_plugin", "derive_names", "plan", "render"]

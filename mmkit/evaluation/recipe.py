"""Benchmark recipes: one YAML file per task = data + instruction + inference mode + metrics.

A recipe (every key but ``name``, ``data`` and ``metrics`` optional)::

    name: cifar10                        # task name in tables and output folders
    description: CIFAR-10 classification (LAMM-Bench)
    modality: NAME                       # what the task needs; suites pick tasks the model can run
    data: meta_file/Classification_CIFAR10.json   # relative: to --data-root, else the run directory
    # ...or data generated on the fly: {generate: "package.module:function", size: 60, seed: 0}
    format: lamm                         # lamm (benchmark meta file) or conversations (LLaVA / generic)
    input_root: .                        # lamm: where input paths start, relative to the data root
    instruction: "{query}"               # lamm: the user turn; {field} is the record's field
    system: null                         # system message (LAMM's per-task one, say)
    reference: label                     # lamm: the field(s) scored against (a list makes an object)
    synonyms: PACKAGE:path/synonyms.yaml # labels' synonyms ({label: [synonym, ...]}, or a file of them)
    mode: generate                       # generate, or choice (the option with the highest likelihood)
    choices: gt_choices                  # choice: a record field (options lettered (A), (B), ...) or a list
    choice_score: sum                    # choice: rank by summed option log-prob, or mean (ChEF's PPL)
    max_new_tokens: 16
    metrics: [accuracy]

``format: lamm`` reads LAMM-Bench meta files: a JSON list of records holding the input under one
of a modality's data keys (LAMM's own 2-D and 3-D keys among them) and the task's fields (``query``,
``label``, ``object``, ``sentences``, ``num``, ``gt_choice``/``gt_choices``, ...); the question gets the modality's
placeholder in front, as LAMM's loader puts the input before the question. ``format: conversations``
reads training-style records: the prompt is the conversation up to its last user turn and the
reference is the last assistant turn (the held-out files ``mmkit train`` evaluates are such files).

``synonyms`` (``{label: [synonym, ...]}``, inline or a YAML file: ``package:path`` inside an installed
package, or a path relative to the recipe) is merged into the references: a label the table names
becomes ``[label, synonym, ...]`` (in a reference string, and in every ``label`` of a reference object
or list of objects), which the label metrics accept. LAMM-Bench's meta files give one label string
("automobile"), where LAMM's scorer credits WordNet synonyms ("car").
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import attrs

from mmkit.errors import ConfigError
from mmkit.specs import LazyRef

FORMATS = ("lamm", "conversations")
MODES = ("generate", "choice")
_KEYS = {"name", "description", "modality", "data", "format", "input_root", "instruction", "system", "reference",
         "mode", "choices", "max_new_tokens", "metrics", "synonyms", "choice_score"}
CHOICE_SCORES = ("sum", "mean")


@attrs.frozen
class Generated:
    """Data written by ``generate(root: Path, *, size: int, seed: int) -> Path`` (the data file)."""

    generate: LazyRef
    size: int = 60
    seed: int = 0


@attrs.frozen
class Recipe:
    name: str
    data: str | Generated
    metrics: tuple[str, ...]
    description: str = ""
    modality: str | None = None
    format: str = "conversations"
    input_root: str | None = None
    instruction: str = "{query}"
    system: str | None = None
    reference: str | tuple[str, ...] = "label"
    mode: str = "generate"
    choices: str | tuple[str, ...] | None = None
    choice_score: str = "sum"
    max_new_tokens: int = 16
    synonyms: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (label, its synonyms), merged into references
    source: str = ""  # the file it came from

    def fields(self) -> set[str]:
        """Record fields the instruction template reads."""
        return {f for _, f, _, _ in string.Formatter().parse(self.instruction) if f}


def _fail(source: str, message: str) -> ConfigError:
    return ConfigError(f"benchmark recipe {source}: {message}")


def parse_recipe(raw: Any, source: str) -> Recipe:
    if not isinstance(raw, Mapping):
        raise _fail(source, "expected a mapping of recipe keys at the top level")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise _fail(source, f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})")
    for key in ("name", "data", "metrics"):
        if key not in raw:
            raise _fail(source, f"missing {key!r}")
    name = _name(raw["name"], source)
    metrics = _metrics(raw["metrics"], source)
    data = _data(raw["data"], source)
    fmt = raw.get("format", "conversations")
    if fmt not in FORMATS:
        raise _fail(source, f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    mode = raw.get("mode", "generate")
    if mode not in MODES:
        raise _fail(source, f"mode {mode!r}: expected one of {', '.join(MODES)}")
    choices = _choices(raw.get("choices"), source, mode=mode, fmt=fmt)
    reference = _reference(raw.get("reference", "label"), source)
    choice_score = raw.get("choice_score", "sum")
    if choice_score not in CHOICE_SCORES:
        raise _fail(source, f"choice_score {choice_score!r}: expected one of {', '.join(CHOICE_SCORES)}")
    max_new_tokens = raw.get("max_new_tokens", 16)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise _fail(source, f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    for key in ("description", "modality", "input_root", "instruction", "system"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise _fail(source, f"{key} must be a string")
    recipe = Recipe(name=name, data=data, metrics=metrics, description=raw.get("description") or "",
                    modality=raw.get("modality"), format=fmt, input_root=raw.get("input_root"),
                    instruction=raw.get("instruction") or "{query}", system=raw.get("system"),
                    reference=reference, mode=mode, choices=choices, choice_score=choice_score,
                    max_new_tokens=max_new_tokens, synonyms=_synonyms(raw.get("synonyms"), source), source=source)
    try:
        recipe.fields()
    except ValueError as exc:
        raise _fail(source, f"instruction {recipe.instruction!r}: {exc}") from None
    return recipe


def _name(name: Any, source: str) -> str:
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-." for c in name):
        raise _fail(source, f"name {name!r}: use letters, digits, '_', '-' or '.'")
    return name


def _metrics(metrics: Any, source: str) -> tuple[str, ...]:
    metrics = (metrics,) if isinstance(metrics, str) else metrics
    if not isinstance(metrics, (list, tuple)) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise _fail(source, "metrics: give a metric name or a list of them")
    return tuple(metrics)


def _data(data: Any, source: str) -> str | Generated:
    """A data path, or the generator that writes the data."""
    if isinstance(data, Mapping):
        extra = sorted(set(data) - {"generate", "size", "seed"})
        if "generate" not in data or extra:
            raise _fail(source, "data: a path, or {generate: 'package.module:function', size: N, seed: N}")
        try:
            return Generated(generate=str(data["generate"]), size=int(data.get("size", 60)),
                             seed=int(data.get("seed", 0)))
        except (TypeError, ValueError) as exc:
            raise _fail(source, f"data: {exc}") from None
    if not isinstance(data, str) or not data:
        raise _fail(source, f"data: expected a path, got {data!r}")
    return data


def _choices(choices: Any, source: str, *, mode: str, fmt: str) -> str | tuple[str, ...] | None:
    """A record field naming the options, or the option texts; ``mode: choice`` needs them."""
    if isinstance(choices, list):
        if not choices or not all(isinstance(c, (str, int, float)) for c in choices):
            raise _fail(source, "choices: a record field name or a non-empty list of option texts")
        choices = tuple(str(c) for c in choices)
    elif choices is not None and not isinstance(choices, str):
        raise _fail(source, "choices: a record field name or a list of option texts")
    if mode == "choice" and choices is None:
        raise _fail(source, "mode: choice needs 'choices' (a record field or a list of options)")
    if mode == "choice" and isinstance(choices, str) and fmt != "lamm":
        raise _fail(source, "choices from a record field need format: lamm; give a list of options")
    return choices


def _reference(reference: Any, source: str) -> str | tuple[str, ...]:
    if isinstance(reference, list):
        if not reference or not all(isinstance(r, str) for r in reference):
            raise _fail(source, "reference: a field name or a list of field names")
        return tuple(reference)
    if not isinstance(reference, str):
        raise _fail(source, "reference: a field name or a list of field names")
    return reference


def _synonyms(table: Any, source: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``{label: [synonym, ...]}`` inline, or a YAML file of it (``package:path`` or a path relative
    to the recipe's folder)."""
    if table is None:
        return ()
    if isinstance(table, str):
        import yaml

        if ":" in table and not Path(table).is_absolute():
            path = packaged_file(table)
        else:
            path = Path(source).parent / table
        try:
            table = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise _fail(source, f"synonyms {path}: {exc}") from None
    if not isinstance(table, Mapping) or not all(
            isinstance(label, str) and isinstance(syns, list) and all(isinstance(w, str) and w.strip() for w in syns)
            for label, syns in table.items()):
        raise _fail(source, "synonyms: a mapping {label: [synonym, ...]} of strings, or a YAML file of one")
    return tuple((label, tuple(syns)) for label, syns in table.items())


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file (YAML, safe_load)."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"benchmark recipe not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"benchmark recipe {path}: not valid YAML: {exc}") from None
    return parse_recipe(raw, str(path))


def packaged_file(ref: str) -> Path:
    """``"package:relative/path.yaml"`` -> the file inside that installed package."""
    package, sep, rel = ref.partition(":")
    if not sep or not package or not rel:
        raise ConfigError(f"recipe reference {ref!r}: expected 'package:path/inside/package.yaml'")
    try:
        root = resources.files(package)
    except ModuleNotFoundError:
        raise ConfigError(f"recipe reference {ref!r}: package {package!r} is not installed") from None
    path = Path(str(root.joinpath(rel)))
    if not path.is_file():
        raise ConfigError(f"recipe reference {ref!r}: no file {rel} in package {package!r}")
    return path


def resolve_benchmark(name_or_path: str, host: Any, modalities: Sequence[str] | None = None) -> list[Recipe]:
    """A recipe file, a registered benchmark, or a suite (every registered benchmark tagged with
    that name whose modality the model has)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return [load_recipe(path)]
    registered = host.benchmarks()
    if name_or_path in registered:
        return [load_recipe(packaged_file(registered[name_or_path].recipe))]
    suite = [spec for spec in registered.values() if name_or_path in spec.suites]
    if not suite:
        known = sorted(set(registered) | {s for spec in registered.values() for s in spec.suites})
        raise ConfigError(f"no benchmark recipe file or registered benchmark named {name_or_path!r}; "
                          f"registered: {', '.join(known) or 'none'}")
    recipes = [load_recipe(packaged_file(spec.recipe)) for spec in suite]
    if modalities is not None:
        recipes = [r for r in recipes if r.modality is None or r.modality in modalities]
        if not recipes:
            raise ConfigError(f"benchmark suite {name_or_path!r} has no task for this model's modalities "
                              f"({', '.join(modalities)})")
    return recipes

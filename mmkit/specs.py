"""The typed descriptors plugins hand to the host.

Everything here is cheap to import: no torch. Heavy objects are reached through *lazy references*,
either a ``"package.module:attribute"`` string (preferred: listable, picklable, costs nothing until
used) or a plain callable (handy for in-process plugins in tests and notebooks).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from typing import Any, Union

import attrs

LazyRef = Union[str, Callable[..., Any]]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
#: export format names are what users type after ``--to``: hyphens allowed (``llava-hf``)
_FORMAT_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def resolve(ref: LazyRef) -> Any:
    """Import and return the object a lazy reference points to."""
    if callable(ref):
        return ref
    module_name, _, attr_path = ref.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    return obj


def _check_name(_instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not _NAME.match(value):
        raise ValueError(
            f"{attribute.name}={value!r}: use lower-case letters, digits and underscores, starting with a letter"
        )


def _check_ref(_instance: Any, attribute: attrs.Attribute, value: LazyRef | None) -> None:
    if value is None or callable(value):
        return
    if not isinstance(value, str) or not _REF.match(value):
        raise ValueError(f"{attribute.name}={value!r}: expected 'package.module:attribute' or a callable")


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return dict(value or {})


def _tuple(value: Any) -> tuple:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@attrs.frozen
class MarkerSpec:
    """How a modality shows up in text.

    ``placeholder`` is what data and prompts contain (``"<image>"``); at assembly each placeholder is
    replaced by ``begin`` + the projected feature tokens + ``end``. ``aliases`` are other spellings
    accepted in data (LAMM's own 3-D placeholder, say) and rewritten to ``placeholder`` on read.
    """

    placeholder: str
    begin: str | None = None
    end: str | None = None
    aliases: tuple[str, ...] = attrs.field(default=(), converter=_tuple)

    def special_tokens(self) -> tuple[str, ...]:
        """The tokens the tokenizer must treat as atomic."""
        return tuple(t for t in (self.placeholder, self.begin, self.end) if t)


@attrs.frozen
class DemoTask:
    """A small, fully offline task for tests and ``mmkit train`` with no data argument.

    Records are in mmkit's generic format (see ``mmkit.records``) with paths relative to the
    folder the demo builder wrote into. ``answers`` is the closed set of answers, so chance accuracy
    is ``1 / len(answers)``.
    """

    train: tuple[Mapping[str, Any], ...] = attrs.field(converter=tuple)
    test: tuple[Mapping[str, Any], ...] = attrs.field(converter=tuple)
    answers: tuple[str, ...] = attrs.field(converter=_tuple)
    metric: str = "accuracy"

    @property
    def chance(self) -> float:
        return 1.0 / len(self.answers)


@attrs.frozen
class DemoSpec:
    """The tiny demo configuration of a modality.

    ``build(root: pathlib.Path, *, seed: int) -> DemoTask`` writes the demo's input files under
    ``root`` and returns the records. ``encoder_options`` are the options for the modality's default
    encoder in its tiny (random-init, no download) configuration.
    """

    build: LazyRef = attrs.field(validator=_check_ref)
    encoder_options: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)
    description: str = ""


@attrs.frozen
class ModalitySpec:
    """A modality: the named bundle a plugin registers.

    - ``data_keys``: record keys holding this modality's file path(s); the first is canonical, the
      rest are accepted aliases (such as LAMM's key for the same data).
    - ``markers``: placeholder and begin/end tokens (see :class:`MarkerSpec`).
    - ``load``: ``load(path: pathlib.Path) -> raw`` decodes one file and validates it, raising
      :class:`mmkit.errors.InputError` (file and reason) on anything unusable. ``raw`` is whatever the
      encoder's ``preprocess`` accepts (a PIL image, an ``N x C`` float array, a waveform, ...).
    - ``encoder`` / ``projector``: default component names (from the encoder / projector hooks).
    - ``encoder_lora_targets``: module names inside the encoder to adapt when encoder LoRA is on.
    - ``demo``: the tiny demo task and encoder options.
    """

    name: str = attrs.field(validator=_check_name)
    data_keys: tuple[str, ...] = attrs.field(converter=_tuple)
    markers: MarkerSpec
    load: LazyRef = attrs.field(validator=_check_ref)
    encoder: str
    projector: str = "mlp"
    file_types: tuple[str, ...] = attrs.field(default=(), converter=_tuple)
    encoder_lora_targets: tuple[str, ...] = attrs.field(default=(), converter=_tuple)
    demo: DemoSpec | None = None
    description: str = ""

    @data_keys.validator
    def _nonempty(self, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
        if not value:
            raise ValueError("data_keys: give at least one record key")


@attrs.frozen
class EncoderSpec:
    """A modality encoder.

    ``build(*, pretrained: str | None, **options) -> mmkit.modeling.ModalityEncoder``. With
    ``pretrained`` (a hub id or a local path) it loads weights with ``from_pretrained``; with
    ``pretrained=None`` it builds a random-init model from ``options`` (``tiny`` holds a
    configuration small enough for a CPU test).
    """

    name: str = attrs.field(validator=_check_name)
    modality: str = attrs.field(validator=_check_name)
    build: LazyRef = attrs.field(validator=_check_ref)
    tiny: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)
    description: str = ""
    #: named random-init configurations at realistic sizes (``{"vit_l14_336": {...options}}``), full
    #: ``build`` options (not merged over ``tiny``); ``mmkit bench --preset real`` measures each
    presets: Mapping[str, Mapping[str, Any]] = attrs.field(
        factory=dict, converter=lambda v: {str(k): _frozen_mapping(o) for k, o in (v or {}).items()})


@attrs.frozen
class ProjectorSpec:
    """A projector from encoder features to the LLM's embedding space.

    ``build(*, in_dim: int, out_dim: int, num_tokens: int | None, **options) -> torch.nn.Module`` whose
    ``forward`` maps ``[B, num_tokens, in_dim]`` to ``[B, T, out_dim]`` and whose attribute
    ``num_output_tokens`` is ``T`` (a resampler changes the token count).

    Contract 1.1: for a variable-size encoder ``num_tokens`` is ``None`` and ``forward`` also takes
    ``mmkit.modeling.features.RaggedFeatures``; a token-wise projector returns ``RaggedFeatures`` of
    the same counts and sets ``num_output_tokens = None``, one that pools returns ``[B, T, out_dim]``.
    When the encoder marks layout rows (``uses_separators``), ``build`` is also given
    ``separator=True``: learn an embedding for the rows ``RaggedFeatures.separators`` marks.
    """

    name: str = attrs.field(validator=_check_name)
    build: LazyRef = attrs.field(validator=_check_ref)
    description: str = ""


@attrs.frozen
class ReaderSpec:
    """A dataset reader.

    ``read(path: pathlib.Path, *, context: mmkit.data.ReadContext) -> Iterator[mmkit.data.Sample]``
    streams normalised samples; ``detect(path, first_record: dict) -> bool`` says whether this
    reader understands a file (for ``--data`` without an explicit format).
    """

    name: str = attrs.field(validator=_check_name)
    read: LazyRef = attrs.field(validator=_check_ref)
    detect: LazyRef | None = attrs.field(default=None, validator=_check_ref)
    description: str = ""


@attrs.frozen
class MetricSpec:
    """An evaluation metric.

    ``compute(predictions: Sequence[str], references: Sequence[Any]) -> dict[str, float]``; the first
    key of the result is the headline figure. A reference is whatever JSON the metric reads (a label,
    a list of synonyms, ``{"bbox": [...]}``, a list of objects, ...); a malformed one raises
    :class:`mmkit.errors.DataError` naming its index. Metrics are pure functions of these texts, so
    ``mmkit eval score`` re-scores any saved predictions file.
    """

    name: str = attrs.field(validator=_check_name)
    compute: LazyRef = attrs.field(validator=_check_ref)
    description: str = ""


def _check_format_name(_instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not _FORMAT_NAME.match(value):
        raise ValueError(f"{attribute.name}={value!r}: use lower-case letters, digits, '-' and '_', "
                         "starting with a letter")


@attrs.frozen
class ExporterSpec:
    """An export format for trained runs (``mmkit export RUN --to NAME OUT``).

    ``export(model: mmkit.inference.LoadedModel, out: pathlib.Path, *, adapter: str | None,
    **options) -> None`` writes the format into ``out`` (a fresh, empty directory; mmkit swaps it into
    place when ``export`` returns). A run the format cannot express exactly is refused by raising
    :class:`mmkit.export.ExportRefused` with the reason, never exported approximately.

    ``check(meta: dict) -> str | None`` (optional) looks at the run's ``mmkit.json`` before any
    model is loaded and returns the reason the format cannot hold the run, or ``None``.
    """

    name: str = attrs.field(validator=_check_format_name)
    export: LazyRef = attrs.field(validator=_check_ref)
    check: LazyRef | None = attrs.field(default=None, validator=_check_ref)
    description: str = ""


def _check_package_file(_instance: Any, attribute: attrs.Attribute, value: str) -> None:
    package, sep, path = value.partition(":") if isinstance(value, str) else ("", "", "")
    if not sep or not re.match(r"^[A-Za-z_][\w.]*$", package) or not path.endswith((".yaml", ".yml")):
        raise ValueError(f"{attribute.name}={value!r}: expected 'package:path/in/package.yaml'")


@attrs.frozen
class BenchmarkSpec:
    """A benchmark task: a YAML recipe shipped inside a package (``"package:path/in/package.yaml"``,
    read with ``importlib.resources``; format in :mod:`mmkit.evaluation.recipe`). ``suites`` are
    the groups it belongs to (``mmkit eval RUN --benchmark SUITE`` runs a whole group)."""

    name: str = attrs.field(validator=_check_name)
    recipe: str = attrs.field(validator=_check_package_file)
    suites: tuple[str, ...] = attrs.field(default=(), converter=_tuple)
    description: str = ""

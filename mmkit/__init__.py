"""mmkit: build multimodal LLMs out of pip-installable modality plugins.

The public API, in one place: ``import mmkit`` then ``mmkit.train``, ``mmkit.load``,
``mmkit.ModalityEncoder`` ... Importing mmkit is cheap (no torch): the errors, the descriptors and
``hookimpl`` are here; every other name is imported from its module on first use (PEP 562). Code
outside the package (the ``mmkit`` command, plugins, scripts) uses these names; the modules
behind them may move.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import pluggy

from mmkit.errors import (
    CheckpointMismatchError,
    ConfigError,
    CorruptFileError,
    DataError,
    InputError,
    MissingFileError,
    MissingInputError,
    MmkitError,
    NotRegisteredError,
    PluginError,
    PluginLoadError,
    RecordSchemaError,
)
from mmkit.specs import (
    BenchmarkSpec,
    DemoSpec,
    DemoTask,
    EncoderSpec,
    ExporterSpec,
    MarkerSpec,
    MetricSpec,
    ModalitySpec,
    ProjectorSpec,
    ReaderSpec,
)

__version__ = "0.1.0"

#: Decorator for hook implementations; plugin authors never import pluggy themselves.
hookimpl = pluggy.HookimplMarker("mmkit")

#: public name -> ``module:attribute`` it is imported from on first use
_LAZY: dict[str, str] = {
    # the plugin contract
    "HOOK_API_VERSION": "mmkit.hookspecs:HOOK_API_VERSION",
    "Sample": "mmkit.records:Sample",
    "Turn": "mmkit.records:Turn",
    "ReadContext": "mmkit.records:ReadContext",
    "read_records": "mmkit.data.readers:read_records",
    "parse_records": "mmkit.data.readers:parse_records",
    "ModalityEncoder": "mmkit.modeling.encoder:ModalityEncoder",
    "PretrainedEncoder": "mmkit.modeling.encoder:PretrainedEncoder",
    "seeded": "mmkit.modeling.encoder:seeded",
    "weights_sha256": "mmkit.modeling.encoder:weights_sha256",
    "RaggedFeatures": "mmkit.modeling.features:RaggedFeatures",
    "Projector": "mmkit.modeling.projector_protocol:Projector",
    "load_state_strict": "mmkit.modeling.persistence:load_state_strict",
    "atomic_write_text": "mmkit.atomic:atomic_write_text",
    # the plugin host
    "PluginHost": "mmkit.plugins:PluginHost",
    "get_host": "mmkit.plugins:get_host",
    "check_encoders": "mmkit.modeling.components:check_encoders",
    "create_plugin": "mmkit.scaffold:create_plugin",
    "plugin_names": "mmkit.scaffold:derive_names",
    # data
    "validate_data": "mmkit.data.validate:validate",
    "prompt_builder_for": "mmkit.data.validate:prompt_builder_for",
    "prompt_lengths_for": "mmkit.data.validate:prompt_lengths_for",
    "default_tokens_per_input": "mmkit.data.validate:default_tokens_per_input",
    "InputTokenCounter": "mmkit.data.validate:InputTokenCounter",
    "encoder_choices": "mmkit.data.preprocess_check:encoder_choices",
    "inspect_record": "mmkit.data.inspect:inspect_record",
    "iter_records": "mmkit.data.inspect:iter_records",
    "prompt_segments": "mmkit.data.inspect:segments",
    "check_template": "mmkit.templates:check_early",
    # training
    "TrainConfig": "mmkit.training.config:TrainConfig",
    "resolve_config": "mmkit.training.config:resolve_config",
    "parse_assignments": "mmkit.training.config:parse_assignments",
    "TRAIN_DEMO_DEFAULTS": "mmkit.training.config:DEMO_DEFAULTS",
    "config_field_type": "mmkit.training.config:base_type",
    "config_field_accepts": "mmkit.training.config:accepted",
    "preflight": "mmkit.training.preflight:preflight",
    "dry_run": "mmkit.training.dry_run:dry_run",
    "print_dry_run": "mmkit.training.dry_run:print_report",
    "launch": "mmkit.training.launch:launch",
    "launched_externally": "mmkit.training.launch:launched_externally",
    "train": "mmkit.training.recipe:train",
    # a trained model
    "load": "mmkit.inference:load",
    "LoadedModel": "mmkit.inference:LoadedModel",
    "GenerationOptions": "mmkit.generation:GenerationOptions",
    "export_run": "mmkit.export:export_run",
    "ExportRefused": "mmkit.export:ExportRefused",
    # evaluation
    "evaluate": "mmkit.evaluation.evaluate:evaluate_run",
    "print_eval": "mmkit.evaluation.evaluate:print_eval",
    "run_benchmark": "mmkit.evaluation.benchmark:run_benchmark",
    "print_benchmark": "mmkit.evaluation.benchmark:print_benchmark",
    "BENCHMARK_SCORES": "mmkit.evaluation.benchmark:SCORES",
    "resolve_benchmark": "mmkit.evaluation.recipe:resolve_benchmark",
    "score_predictions_file": "mmkit.evaluation.scoring:score_predictions_file",
    # speed
    "run_bench": "mmkit.bench.suite:run",
    "load_bench_report": "mmkit.bench.compare:load_report",
    "compare_bench": "mmkit.bench.compare:compare",
    "bench_regressions": "mmkit.bench.compare:regressions",
    "print_bench_report": "mmkit.bench.report:print_report",
    "print_bench_comparison": "mmkit.bench.report:print_comparison",
}

# a literal list, as type checkers read it; tests/test_public_api.py checks it against _LAZY
__all__ = [
    "BENCHMARK_SCORES", "BenchmarkSpec", "CheckpointMismatchError", "ConfigError", "CorruptFileError",
    "DataError", "DemoSpec", "DemoTask", "EncoderSpec", "ExportRefused", "ExporterSpec", "GenerationOptions",
    "HOOK_API_VERSION", "InputError", "InputTokenCounter", "LoadedModel", "MarkerSpec", "MetricSpec",
    "MissingFileError", "MissingInputError", "MmkitError", "ModalityEncoder", "ModalitySpec", "NotRegisteredError",
    "PluginError", "PluginHost", "PluginLoadError", "PretrainedEncoder", "Projector", "ProjectorSpec", "RaggedFeatures",
    "ReadContext", "ReaderSpec", "RecordSchemaError", "Sample", "TRAIN_DEMO_DEFAULTS", "TrainConfig", "Turn",
    "atomic_write_text", "bench_regressions", "check_encoders", "check_template", "compare_bench",
    "config_field_accepts", "config_field_type", "create_plugin", "default_tokens_per_input", "dry_run",
    "encoder_choices", "evaluate", "export_run", "get_host", "hookimpl", "inspect_record", "iter_records", "launch",
    "launched_externally", "load", "load_bench_report", "load_state_strict", "parse_assignments",
    "parse_records", "plugin_names", "preflight", "print_bench_comparison", "print_bench_report",
    "print_benchmark", "print_dry_run", "print_eval", "prompt_builder_for", "prompt_lengths_for",
    "prompt_segments", "read_records", "resolve_benchmark", "resolve_config", "run_bench", "run_benchmark",
    "score_predictions_file", "seeded", "train", "validate_data", "weights_sha256",
]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        # AttributeError (not a bare KeyError): ``from mmkit import hookspecs`` then imports the submodule.
        raise AttributeError(f"module 'mmkit' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    # Looked up on every use, not cached here: mmkit.train is always mmkit.training.recipe.train,
    # also after a test (or a plugin) replaced that.
    return getattr(importlib.import_module(module), attr)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports these on use
    from mmkit.atomic import atomic_write_text
    from mmkit.bench.compare import compare as compare_bench
    from mmkit.bench.compare import load_report as load_bench_report
    from mmkit.bench.compare import regressions as bench_regressions
    from mmkit.bench.report import print_comparison as print_bench_comparison
    from mmkit.bench.report import print_report as print_bench_report
    from mmkit.bench.suite import run as run_bench
    from mmkit.data.inspect import inspect_record, iter_records
    from mmkit.data.inspect import segments as prompt_segments
    from mmkit.data.preprocess_check import encoder_choices
    from mmkit.data.readers import parse_records, read_records
    from mmkit.data.validate import InputTokenCounter, default_tokens_per_input, prompt_builder_for, prompt_lengths_for
    from mmkit.data.validate import validate as validate_data
    from mmkit.evaluation.benchmark import SCORES as BENCHMARK_SCORES
    from mmkit.evaluation.benchmark import print_benchmark, run_benchmark
    from mmkit.evaluation.evaluate import evaluate_run as evaluate
    from mmkit.evaluation.evaluate import print_eval
    from mmkit.evaluation.recipe import resolve_benchmark
    from mmkit.evaluation.scoring import score_predictions_file
    from mmkit.export import ExportRefused, export_run
    from mmkit.generation import GenerationOptions
    from mmkit.hookspecs import HOOK_API_VERSION
    from mmkit.inference import LoadedModel, load
    from mmkit.modeling.components import check_encoders
    from mmkit.modeling.encoder import ModalityEncoder, PretrainedEncoder, seeded, weights_sha256
    from mmkit.modeling.features import RaggedFeatures
    from mmkit.modeling.persistence import load_state_strict
    from mmkit.modeling.projector_protocol import Projector
    from mmkit.plugins import PluginHost, get_host
    from mmkit.records import ReadContext, Sample, Turn
    from mmkit.scaffold import create_plugin
    from mmkit.scaffold import derive_names as plugin_names
    from mmkit.templates import check_early as check_template
    from mmkit.training.config import DEMO_DEFAULTS as TRAIN_DEMO_DEFAULTS
    from mmkit.training.config import TrainConfig, parse_assignments, resolve_config
    from mmkit.training.config import accepted as config_field_accepts
    from mmkit.training.config import base_type as config_field_type
    from mmkit.training.dry_run import dry_run
    from mmkit.training.dry_run import print_report as print_dry_run
    from mmkit.training.launch import launch, launched_externally
    from mmkit.training.preflight import preflight
    from mmkit.training.recipe import train

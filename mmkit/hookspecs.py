"""The plugin contract: every hook mmkit calls, with what it passes and what it expects back.

Hooks are called with keyword arguments only; an implementation declares just the parameters it
uses (pluggy passes only those) and never gives them defaults. Registration hooks return typed,
lazy descriptors from :mod:`mmkit.specs`: importing a plugin must not import torch.

``docs/plugins.md`` carries this reference for readers; a test keeps the two in step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from mmkit.specs import (BenchmarkSpec, EncoderSpec, ExporterSpec, MetricSpec, ModalitySpec, ProjectorSpec,
                             ReaderSpec)

PROJECT = "mmkit"
#: Version of this contract. Plugins declare the range they support with ``mmkit>=X,<Y`` in their
#: dependencies; ``mmkit plugins check`` verifies it. 1.1 added inputs of any size (an encoder's
#: ``num_tokens`` / ``input_shape`` may be ``None``; ``collate``, ``num_tokens_for``, ``blank``,
#: ``RaggedFeatures``); every 1.0 plugin works unchanged.
HOOK_API_VERSION = "1.1"

hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec
def mmkit_modalities() -> Sequence[ModalitySpec]:
    """Register modalities: the bundle of data keys, tokenizer markers, file loader, default
    encoder, projector and LoRA targets, and the tiny demo task.

    Return a list of :class:`mmkit.specs.ModalitySpec`. A modality name registered by two plugins
    is an error naming both.

    Example::

        @hookimpl
        def mmkit_modalities():
            return [ModalitySpec(
                name="audio", data_keys=("audio",),
                markers=MarkerSpec("<audio>", begin="<Aud>", end="</Aud>"),
                load="mmkit_plugin_audio.io:load_wav", encoder="logmel_conv",
                demo=DemoSpec(build="mmkit_plugin_audio.demo:build_demo"),
            )]
    """


@hookspec
def mmkit_encoders() -> Sequence[EncoderSpec]:
    """Register modality encoders (frozen feature extractors).

    Return a list of :class:`mmkit.specs.EncoderSpec`. ``build`` returns a
    :class:`mmkit.modeling.ModalityEncoder`, of one of two kinds:

    - fixed size: ``input_shape`` and ``num_tokens`` are set; ``preprocess(raw) -> Tensor`` of
      ``input_shape`` for one input, batches are ``torch.stack``-ed, and
      ``forward(Tensor[B, *input_shape]) -> Tensor[B, num_tokens, output_dim]``;
    - variable size (contract 1.1: any-resolution images, video, graphs, long audio):
      ``num_tokens = None`` (and ``input_shape = None`` for inputs that are not one tensor shape);
      ``preprocess(raw)`` returns any object, ``collate(items)`` batches them,
      ``num_tokens_for(item) -> int`` says how many tokens an input becomes before it is encoded,
      ``blank(batch_size)`` returns a collated blank batch, and ``forward(batch)`` returns
      ``mmkit.modeling.features.RaggedFeatures(values[sum(counts), output_dim], counts)``.
      ``uses_separators = True`` gives the projector a learned separator for rows the encoder marks.

    Example::

        @hookimpl
        def mmkit_encoders():
            return [EncoderSpec(name="logmel_conv", modality="audio",
                                build="mmkit_plugin_audio.encoder:build_encoder",
                                tiny={"hidden_size": 32, "num_layers": 1})]
    """


@hookspec
def mmkit_projectors() -> Sequence[ProjectorSpec]:
    """Register projectors (encoder features -> LLM embeddings).

    Return a list of :class:`mmkit.specs.ProjectorSpec`. mmkit's own ``linear``, ``mlp`` and
    ``resampler`` projectors are registered through this hook too. A projector also takes the
    ``RaggedFeatures`` of a variable-size encoder (``num_tokens=None`` at build time), and
    ``separator=True`` when that encoder marks layout rows (see :class:`mmkit.specs.ProjectorSpec`).

    Example::

        @hookimpl
        def mmkit_projectors():
            return [ProjectorSpec(name="qformer", build="my_pkg.qformer:build")]
    """


@hookspec(firstresult=True)
def mmkit_lora_targets(model_type: str, module_names: Sequence[str]) -> Sequence[str] | None:
    """Choose the LLM modules LoRA adapts.

    ``model_type`` is the Hugging Face ``config.model_type`` (``"llama"``, ``"qwen2"``, ...) and
    ``module_names`` the names of the model's ``nn.Linear`` leaves. Return module-name suffixes for
    peft's ``target_modules``, or ``None`` to let the next plugin decide. The first non-``None``
    answer wins; mmkit's built-in table answers last.

    Example::

        @hookimpl
        def mmkit_lora_targets(model_type):
            if model_type == "mamba":
                return ["in_proj", "out_proj"]
            return None
    """


@hookspec
def mmkit_dataset_readers() -> Sequence[ReaderSpec]:
    """Register dataset readers (file formats of instruction data).

    Return a list of :class:`mmkit.specs.ReaderSpec`. mmkit's ``llava``, ``lamm`` and ``generic``
    readers are registered through this hook too. A modality's raw-file loader is part of its
    :class:`~mmkit.specs.ModalitySpec` (``load``).

    Example::

        @hookimpl
        def mmkit_dataset_readers():
            return [ReaderSpec(name="sharegpt4v", read="my_pkg.data:read",
                               detect="my_pkg.data:detect")]
    """


@hookspec
def mmkit_metrics() -> Sequence[MetricSpec]:
    """Register evaluation metrics.

    Return a list of :class:`mmkit.specs.MetricSpec`; ``compute(predictions, references)`` returns a
    ``dict[str, float]`` whose first key is the headline figure.

    Example::

        @hookimpl
        def mmkit_metrics():
            return [MetricSpec(name="count_mae", compute="my_pkg.metrics:count_mae")]
    """


@hookspec
def mmkit_exporters() -> Sequence[ExporterSpec]:
    """Register export formats for trained runs (``mmkit export RUN --to NAME OUT``).

    Return a list of :class:`mmkit.specs.ExporterSpec`. ``export(model, out, *, adapter, **options)``
    receives the loaded :class:`mmkit.inference.LoadedModel` and an empty directory to fill, and
    raises :class:`mmkit.export.ExportRefused` with the reason when the format cannot hold the run
    exactly. mmkit's own ``peft`` and ``merged`` formats are registered through this hook too.

    Example::

        @hookimpl
        def mmkit_exporters():
            return [ExporterSpec(name="llava-hf", export="my_pkg.export:to_llava",
                                 check="my_pkg.export:why_not")]
    """


@hookspec
def mmkit_benchmarks() -> Sequence[BenchmarkSpec]:
    """Register benchmark tasks for ``mmkit eval RUN --benchmark NAME``.

    Return a list of :class:`mmkit.specs.BenchmarkSpec`. ``recipe`` names a YAML recipe shipped in
    a package (``"package:path/in/package.yaml"``: data, instruction, inference mode and metrics;
    the format is described in :mod:`mmkit.evaluation.recipe`). ``suites`` are group names: ``mmkit
    eval RUN --benchmark SUITE`` runs every task of the suite whose modality the model has.

    Example::

        @hookimpl
        def mmkit_benchmarks():
            return [BenchmarkSpec(name="cifar10", recipe="my_pkg:benchmarks/cifar10.yaml",
                                  suites=("lamm2d",))]
    """


@hookspec
def mmkit_commands(app: Any) -> None:
    """Add commands to the ``mmkit`` CLI.

    ``app`` is the root ``typer.Typer``. Add a Typer sub-app (``app.add_typer(sub, name=...)``) or a
    command (``@app.command()``); keep heavy imports inside the command functions so ``mmkit --help``
    stays fast.

    Example::

        @hookimpl
        def mmkit_commands(app):
            import typer
            sub = typer.Typer(help="Audio tools")
            @sub.command()
            def inspect(path: str):
                ...
            app.add_typer(sub, name="audio")
    """

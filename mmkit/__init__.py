"""mmkit: build multimodal LLMs out of pip-installable modality plugins.

Importing mmkit is cheap (no torch): the public descriptors and ``hookimpl`` are here; the model,
training and inference APIs are imported on first use.
"""

from __future__ import annotations

from typing import Any

import pluggy

from mmkit.errors import InputError, MmkitError
from mmkit.specs import (
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

__all__ = [
    "DemoSpec",
    "DemoTask",
    "EncoderSpec",
    "ExporterSpec",
    "InputError",
    "MarkerSpec",
    "MetricSpec",
    "MmkitError",
    "ModalitySpec",
    "ProjectorSpec",
    "ReaderSpec",
    "hookimpl",
    "load",
]


def load(output_dir: Any, **kwargs: Any) -> Any:
    """Load a trained model from an output directory; see :func:`mmkit.inference.load`."""
    from mmkit.inference import load as _load

    return _load(output_dir, **kwargs)

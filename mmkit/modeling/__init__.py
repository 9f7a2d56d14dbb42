"""Torch-side building blocks. Importing this package imports torch."""

import os

import torch

if not torch.cuda.is_available():
    # Name DeepSpeed's accelerator up front: its auto-detection prints a warning on every CPU run
    # (transformers imports it too).
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from mmkit.modeling.encoder import ModalityEncoder

__all__ = ["ModalityEncoder"]

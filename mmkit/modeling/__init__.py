"""Torch-side building blocks. Importing this package imports torch."""

from mmkit.modeling.encoder import ModalityEncoder

__all__ = ["ModalityEncoder"]

"""Instruction data: normalised samples, readers, validation and batching."""

from mmkit.records import ReadContext, Sample, Turn

__all__ = ["ReadContext", "Sample", "Turn"]

"""Benchmarks shared by ``mmkit bench`` and ``benchmarks/`` (pytest-benchmark).

- ``components``: encoder and projector throughput per modality (and the wrapper's overhead);
- ``step``: the training step, phase by phase, mmkit's loop and its variants;
- ``plain_loop``: the LLaVA-style baseline the step is compared with;
- ``machine``: machine description and the measured matmul peak; ``stats``: repeated measurements;
- ``suite``: one preset's figures as a report; ``compare``: two reports, figure by figure.
"""

from mmkit.bench.components import Components, bench_components, bench_modality, components, encode, project

__all__ = ["Components", "bench_components", "bench_modality", "components", "encode", "project"]

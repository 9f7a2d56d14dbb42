"""Encoder and projector throughput (pytest-benchmark). Reported, not asserted: run
``pytest benchmarks/ --benchmark-only`` and compare the rows of one run."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from mmkit.bench import components, encode, project  # noqa: E402
from mmkit.plugins import PluginHost  # noqa: E402

HOST = PluginHost()
MODALITIES = sorted(HOST.modalities())
BATCH = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("modality", MODALITIES)
def test_encoder_throughput(benchmark, modality):
    c = components(HOST, modality, batch_size=BATCH)
    out = benchmark(encode, c)
    benchmark.extra_info["items_per_round"] = BATCH
    assert out.shape[:2] == (BATCH, c.encoder.num_tokens)


@pytest.mark.parametrize("projector", ["linear", "mlp", "resampler"])
@pytest.mark.parametrize("modality", MODALITIES)
def test_projector_throughput(benchmark, modality, projector):
    c = components(HOST, modality, batch_size=BATCH, hidden=256, projector=projector)
    features = encode(c)
    out = benchmark(project, c, features)
    benchmark.extra_info["items_per_round"] = BATCH
    assert out.shape == (BATCH, c.projector.num_output_tokens, 256)

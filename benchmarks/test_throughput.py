"""Encoder and projector throughput (pytest-benchmark), at the sizes and thread count the demo trains
with: its encoders, its LLM's width (64), one thread, micro-batches of 32. Reported, not asserted:

    pytest benchmarks/test_throughput.py --benchmark-only --benchmark-json out.json

pytest-benchmark's own figures are seconds (and OPS) per call of a whole batch; each row's
``extra_info`` adds ``inputs_per_s`` (median, min, max) and output ``tokens_per_s``, which compare
across batch sizes. ``mmkit bench`` measures these and the training step in one run."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from mmkit.bench import components, encode, project  # noqa: E402
from mmkit.plugins import PluginHost  # noqa: E402
from mmkit.training.config import DEMO_DEFAULTS  # noqa: E402

HOST = PluginHost()
MODALITIES = sorted(HOST.modalities())
BATCH = int(DEMO_DEFAULTS["micro_batch_size"])
HIDDEN = 64  # the demo LLM's width (mmkit.demo.llm.build_tiny_llm)


@pytest.fixture(scope="module", autouse=True)
def training_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(int(DEMO_DEFAULTS["num_threads"]))
    yield
    torch.set_num_threads(previous)


def _items(benchmark, items: int, tokens_per_item: int) -> None:
    """Per-item figures from pytest-benchmark's per-call times (fastest call = highest rate)."""
    if benchmark.stats is None:  # --benchmark-disable (the CI smoke run): one call, no timing
        return
    stats = benchmark.stats.stats
    benchmark.extra_info.update({
        "items_per_round": items,
        "inputs_per_s": {"median": items / stats.median, "min": items / stats.max, "max": items / stats.min},
        "tokens_per_s": {"median": items * tokens_per_item / stats.median},
    })


@pytest.mark.parametrize("modality", MODALITIES)
def test_encoder_throughput(benchmark, modality):
    c = components(HOST, modality, batch_size=BATCH, hidden=HIDDEN)
    out = benchmark(encode, c)
    tokens = _rows_per_input(out)
    _items(benchmark, BATCH, tokens)
    assert tokens > 0 and _inputs(out) == BATCH
    if c.encoder.num_tokens is not None:
        assert out.shape[:2] == (BATCH, c.encoder.num_tokens)


@pytest.mark.parametrize("projector", ["linear", "mlp", "resampler"])
@pytest.mark.parametrize("modality", MODALITIES)
def test_projector_throughput(benchmark, modality, projector):
    c = components(HOST, modality, batch_size=BATCH, hidden=HIDDEN, projector=projector)
    features = encode(c)
    out = benchmark(project, c, features)
    _items(benchmark, BATCH, _rows_per_input(out))
    assert _inputs(out) == BATCH
    if c.projector.num_output_tokens is not None:
        assert out.shape == (BATCH, c.projector.num_output_tokens, HIDDEN)


def _inputs(out) -> int:
    """Inputs in a fixed ``[B, T, D]`` or a variable-size (``RaggedFeatures``) output."""
    counts = getattr(out, "counts", None)
    return len(counts) if counts is not None else out.shape[0]


def _rows_per_input(out) -> float:
    counts = getattr(out, "counts", None)
    return sum(counts) / len(counts) if counts is not None else out.shape[1]

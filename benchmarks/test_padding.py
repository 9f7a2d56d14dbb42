"""Padding fractions as a pytest run (``pytest benchmarks/test_padding.py -s``): packing keeps
padding under 5 % on the demo data and on a LLaVA-like length mix, far below pad-to-longest.
The full report: ``python benchmarks/bench_padding.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from bench_padding import compare, demo_lengths, llava_like_lengths, report  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    torch.set_num_threads(1)


def test_demo_padding(tmp_path_factory):
    lengths, groups = demo_lengths(tmp_path_factory.mktemp("demo"))
    rows = compare(lengths, groups, batch_size=32, pack=[(256, 4)])
    report("demo data", rows)
    pad, grouped, packed = (fraction for _, fraction, _ in rows)
    assert packed < 0.05 and grouped < 0.05 and pad > 0.10


def test_llava_like_padding():
    lengths, groups = llava_like_lengths(5_000)
    rows = compare(lengths, groups, batch_size=16, pack=[(4096, 3)])
    report("synthetic LLaVA-like", rows)
    pad, _grouped, packed = (fraction for _, fraction, _ in rows)
    assert packed < 0.05 and pad > 0.30

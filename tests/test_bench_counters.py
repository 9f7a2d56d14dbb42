"""Logged throughput and padding are window totals: tokens/s = the window's real tokens over its
wall time, padding over every micro-batch of the window (driven through the real training loop
with a scripted engine and clock)."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
from mmkit.training import trainer as loop_module
from mmkit.training.checkpoint import TrainState
from mmkit.training.config import TrainConfig
from mmkit.training.metrics_log import window_rates


def test_window_rates_are_ratios_of_sums():
    assert window_rates(28, 32, 4.0) == {"tokens_per_s": 7.0, "padding_fraction": 0.125}
    assert window_rates(0, 0, 1.0)["padding_fraction"] != window_rates(0, 0, 1.0)["padding_fraction"]  # nan


class Clock:
    """``time`` for the loop module: each forward pass advances it by the batch's scripted cost."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


class Engine:
    def __init__(self) -> None:
        self.optimizer = types.SimpleNamespace(step=lambda *a, **k: None)
        self.micro = 0

    def train(self) -> None:
        pass

    def backward(self, loss: Any) -> None:
        pass

    def is_gradient_accumulation_boundary(self) -> bool:
        return self.micro % 2 == 1  # two micro-batches per step

    def step(self) -> None:
        self.micro += 1


class Sampler:
    steps_per_epoch = 100

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        pass


_COST: dict[int, float] = {}  # id(batch) -> the seconds its forward pass takes on the fake clock


def _batch(real: int, slots: int, seconds: float) -> Any:
    from mmkit.data.batch import Batch

    rows = 2
    mask = torch.zeros(rows, slots // rows, dtype=torch.long)
    mask.view(-1)[:real] = 1
    batch = Batch(mask, mask, mask, ids=["a", "b"], modalities=((), ()), num_tokens=real, num_slots=slots)
    _COST[id(batch)] = seconds
    return batch


def test_loop_logs_time_weighted_tokens_per_s_and_window_padding(monkeypatch, tmp_path):
    clock = Clock()
    monkeypatch.setattr(loop_module, "time", clock)
    # step 1: a slow, half-padded micro-batch then a fast, full one; step 2 likewise
    batches = [_batch(4, 8, 1.0), _batch(24, 24, 3.0)] * 2

    def forward(engine: Any, batch: Any, dev: Any) -> Any:
        clock.now += _COST[id(batch)]
        return types.SimpleNamespace(loss=torch.tensor(1.0))

    logged: list[dict[str, Any]] = []
    log = types.SimpleNamespace(log=lambda step, values: logged.append({"step": step, **values}))
    cfg = TrainConfig(llm="x", log_every=1, save_every=0, on_nonfinite_loss="skip", seed=0)
    sched = types.SimpleNamespace(get_last_lr=lambda: [1e-3])

    trainer = loop_module.Trainer(cfg, Engine(), batches, Sampler(), sched, log, process=loop_module.Process(),
                                  save=lambda s: "", forward=forward)
    trainer.run(TrainState(), 2)
    assert [r["step"] for r in logged if "loss" in r] == [1, 2]
    first = logged[0]
    # 28 real tokens in 4 s: 7 tokens/s (the mean of the two micro-batches' rates would say 6)
    assert first["tokens_per_s"] == pytest.approx(7.0)
    # 4 padded slots of 32 over the window (the last micro-batch alone has none)
    assert first["padding_fraction"] == pytest.approx(4 / 32)

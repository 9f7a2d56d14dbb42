"""Faults with clear outcomes: non-finite loss (skip and count, or stop naming the step and records),
out of memory (advice), disk full during a save (previous checkpoint kept, no process left waiting),
and a stuck process (the others fail after the collective timeout instead of hanging).

Faults are injected with ``MMKIT_FAULT`` (see ``mmkit/training/faults.py``) into real training
subprocesses, each run under a time limit.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from mmkit.errors import MmkitError
from mmkit.training import checkpoint as ckpt
from mmkit.training import faults

TIMEOUT = 300


@pytest.fixture(scope="module")
def tiny(mm_host, tmp_path_factory) -> dict[str, str]:
    from drill import write_tiny_run

    return write_tiny_run(tmp_path_factory.mktemp("tiny_faults"))


def _train(run: dict[str, str], out: Path, *, fault: str | None = None, **options):
    import drill

    env = drill.child_env({"MMKIT_FAULT": fault} if fault else None)
    return drill.run(drill.train_command(run, out, **{"max_steps": 5, **options}), timeout=TIMEOUT, env=env)


def _text(result) -> str:
    return result.stdout.replace("\n", " ")


# -- unit -----------------------------------------------------------------------------------------------
def test_fault_spec_and_classification(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setenv(faults.FAULT_ENV, "nan@3:1,die@5:*")
    assert faults.injected("nan", 3, 1) and not faults.injected("nan", 3, 0) and not faults.injected("nan", 4, 1)
    assert faults.injected("die", 5, 0) and faults.injected("die", 5, 7)
    monkeypatch.setenv(faults.FAULT_ENV, "explode@3")
    with pytest.raises(MmkitError, match="KIND@STEP"):
        faults.injected("nan", 3, 0)
    assert faults.is_out_of_memory(MemoryError())
    assert faults.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert faults.is_out_of_memory(torch.OutOfMemoryError("x"))
    assert not faults.is_out_of_memory(RuntimeError("shape mismatch"))
    assert faults.is_collective_failure(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer"))
    assert faults.is_collective_failure(torch.distributed.DistBackendError("NCCL watchdog timeout"))
    assert not faults.is_collective_failure(ValueError("timed out"))


def test_out_of_memory_advice_names_the_knobs() -> None:
    import torch

    from mmkit.training.config import TrainConfig

    cfg = TrainConfig(llm="x", micro_batch_size=16, zero_stage=2, precision="fp32", max_length=4096)
    text = str(faults.out_of_memory_error(MemoryError("boom"), step=7, cfg=cfg, device=torch.device("cpu")))
    for needle in ("out of memory at step 7 on cpu", "micro_batch_size (16)", "global_batch_size",
                   "--gradient-checkpointing", "--zero-stage 3 (now 2)", "bf16", "max_length (4096)"):
        assert needle in text


# -- end to end ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_nonfinite_loss_on_one_process_skips_the_step_everywhere(tiny, tmp_path: Path) -> None:
    from drill import load_trainable

    out = tmp_path / "run"
    result = _train(tiny, out, fault="nan@3:1", num_procs=2, global_batch_size=4, save_every=1, keep_last=10)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "step 3: non-finite loss, update skipped (loss nan on process 1, records" in _text(result)
    # no process applied an update at step 3 (process 0's loss was finite): weights unchanged
    at2, at3, at4 = (load_trainable(out / "checkpoints" / f"step-0000000{s}") for s in (2, 3, 4))
    assert all(bool((at2[k] == at3[k]).all()) for k in at2)
    assert any(not bool((at3[k] == at4[k]).all()) for k in at3)
    assert all(bool(v.isfinite().all()) for v in load_trainable(out).values())
    state = ckpt.read_state(out / "checkpoints" / "step-00000005")
    assert state["nonfinite_steps"] == 1
    last = [line for line in (out / "metrics.jsonl").read_text().splitlines() if "nonfinite_steps" in line][-1]
    assert '"nonfinite_steps": 1' in last


@pytest.mark.slow
def test_nonfinite_loss_can_stop_naming_step_and_records(tiny, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _train(tiny, out, fault="nan@3", on_nonfinite_loss="stop", save_every=2)
    assert result.returncode == 1, result.stdout[-3000:]
    text = _text(result)
    assert "error: non-finite loss at step 3 (epoch 0, step 3 of the epoch): loss nan on process 0, records " in text
    assert "img-" in text or "pcl-" in text
    assert f"the last checkpoint is {out / 'checkpoints' / 'step-00000002'}" in text
    assert "Traceback" not in text


@pytest.mark.slow
def test_out_of_memory_gives_advice(tiny, tmp_path: Path) -> None:
    result = _train(tiny, tmp_path / "run", fault="oom@2")
    assert result.returncode == 1, result.stdout[-3000:]
    text = _text(result)
    assert "error: out of memory at step 2 on cpu" in text and "--gradient-checkpointing" in text
    assert "Traceback" not in text


@pytest.mark.slow
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tiny, tmp_path: Path) -> None:
    """ENOSPC on process 1 in the middle of DeepSpeed's ZeRO-2 writes: its failure is held back until
    every process has finished its part, then all of them stop with the same clear error."""
    out = tmp_path / "run"
    start = time.monotonic()
    result = _train(tiny, out, fault="enospc_in_save@4:1", num_procs=2, zero_stage=2, global_batch_size=4,
                    save_every=2)
    assert time.monotonic() - start < TIMEOUT
    assert result.returncode == 1, result.stdout[-3000:]
    text = _text(result)
    for rank in (0, 1):
        assert (f"error (process {rank}): could not write checkpoint step-00000004 in {out / 'checkpoints'} "
                f"(process 1: {os.strerror(errno.ENOSPC)}") in text
    assert f"the previous checkpoint {out / 'checkpoints' / 'step-00000002'} is kept and loadable" in text
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000002"]
    assert not list((out / "checkpoints").glob(".step-*"))  # the partial one was removed
    assert ckpt.verify(out / "checkpoints" / "step-00000002", 0) is None
    assert ckpt.verify(out / "checkpoints" / "step-00000002", 1) is None


@pytest.mark.slow
def test_a_stuck_process_makes_the_others_fail_after_the_collective_timeout(tiny, tmp_path: Path) -> None:
    out = tmp_path / "run"
    start = time.monotonic()
    result = _train(tiny, out, fault="hang@3:1", num_procs=2, zero_stage=2, global_batch_size=4,
                    collective_timeout_s=5)
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stdout[-3000:]
    text = _text(result)
    assert "error (process 0): process 0 of 2: a collective operation failed at step 3" in text
    assert "Timed out" in text and "collectives time out after 5s" in text
    assert "training process 0 of 2 failed (exit status 1); process 1 stopped" in text
    assert elapsed < 150

"""Faults with clear outcomes: non-finite loss (skip and count, or stop naming the step and records),
out of memory (advice), disk full during a save (previous checkpoint kept, no process left waiting),
and a stuck process (the others fail after the collective timeout instead of hanging).

Faults are injected with ``MMKIT_FAULT`` (see ``mmkit/training/faults.py``) into real training
subprocesses, each run under a time limit.
"""

from __future__ import annotations

import errno
import json
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


def test_fault_policies_decide_from_the_agreed_flags() -> None:
    import torch

    from mmkit.training.config import TrainConfig

    local = faults.StepFaults()
    assert not faults.agree(local, world=1).skip
    local.nonfinite.append("loss nan on process 0, records a")
    agreed = faults.agree(local, world=1)
    assert agreed.skip and agreed.nonfinite and not agreed.out_of_memory

    stop = faults.NonFinitePolicy("stop")
    with pytest.raises(faults.TrainingError, match=r"non-finite loss at step 4 \(epoch 1, step 2 of the epoch\): "
                                                   r"loss nan on process 0, records a\. No update was applied"):
        stop.before_update(agreed, local.nonfinite, world=1, step=4, epoch=1, step_in_epoch=1, last_checkpoint=None)
    skip = faults.NonFinitePolicy("skip", max_consecutive=2)
    skip.before_update(agreed, local.nonfinite, world=1, step=4, epoch=1, step_in_epoch=1, last_checkpoint=None)
    skip.after_skip(agreed, step=4, last_checkpoint=None)
    skip.after_skip(faults.Agreed(nonfinite=False, out_of_memory=True), step=5, last_checkpoint=None)  # resets
    skip.after_skip(agreed, step=6, last_checkpoint=None)
    with pytest.raises(faults.TrainingError, match="2 steps in a row up to step 7 had a non-finite loss"):
        skip.after_skip(agreed, step=7, last_checkpoint="ck")

    cfg = TrainConfig(llm="x")
    oom = faults.OutOfMemoryPolicy("stop", cfg=cfg, device=torch.device("cpu"))
    assert not oom.recover(MemoryError(), step=3)
    assert "out of memory at step 3 on cpu" in str(oom.error(MemoryError("boom"), step=3))
    oom = faults.OutOfMemoryPolicy("skip", cfg=cfg, device=torch.device("cpu"), max_consecutive=2)
    assert oom.recover(MemoryError(), step=3)
    hit = faults.Agreed(nonfinite=False, out_of_memory=True)
    oom.after_skip(hit, step=3)
    assert oom.skipped_steps == 1
    with pytest.raises(faults.TrainingError, match="out of memory in 2 steps in a row up to step 4"):
        oom.after_skip(hit, step=4)

    broken = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer")
    assert faults.CollectiveFailurePolicy(rank=0, world=1, timeout_s=5).error(broken, step=2, last_checkpoint=None) is None
    error = faults.CollectiveFailurePolicy(rank=1, world=2, timeout_s=5).error(broken, step=2, last_checkpoint=None)
    assert "process 1 of 2: a collective operation failed at step 2" in str(error)


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
def test_out_of_memory_on_one_process_can_skip_the_step_everywhere(tiny, tmp_path: Path) -> None:
    """on_out_of_memory: skip: process 1's micro-batch of step 3 runs out of memory; it runs a zero-weight
    stand-in instead (its gradient all-reduce still pairs up), both processes agree to skip step 3's
    update, count it and go on."""
    from drill import load_trainable

    out = tmp_path / "run"
    result = _train(tiny, out, fault="oom@3:1", num_procs=2, global_batch_size=4, save_every=1, keep_last=10,
                    on_out_of_memory="skip")
    assert result.returncode == 0, result.stdout[-4000:]
    assert ("step 3: out of memory, update skipped (process 1: injected out-of-memory (MMKIT_FAULT))"
            in _text(result))
    at2, at3, at4 = (load_trainable(out / "checkpoints" / f"step-0000000{s}") for s in (2, 3, 4))
    assert all(bool((at2[k] == at3[k]).all()) for k in at2)  # neither process applied step 3
    assert any(not bool((at3[k] == at4[k]).all()) for k in at3)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["oom_skipped_steps"] for r in logged if "loss" in r] == [0, 0, 1, 1, 1]
    assert "Traceback" not in _text(result)


def test_skipping_out_of_memory_needs_zero_stage_0(tmp_path: Path) -> None:
    from mmkit.errors import ConfigError
    from mmkit.training import recipe
    from mmkit.training.config import TrainConfig

    with pytest.raises(ConfigError, match="on_out_of_memory: skip needs ZeRO stage 0 \\(now 2\\)"):
        recipe.train(TrainConfig(llm="x", data=("d.jsonl",), zero_stage=2, on_out_of_memory="skip",
                                 output_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


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


# -- a full disk in any library's writer (the real writers, under a file-size limit of zero) ---------------
def test_storage_errors_of_every_writer_are_recognised(tmp_path: Path) -> None:
    """The errors safetensors, torch.save (DeepSpeed's writer) and TensorBoard really raise when a
    file cannot grow, recognised and described as storage errors (before: only OSError was)."""
    import subprocess
    import sys

    code = f"""
import json, resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
import torch
from safetensors.torch import save_file
from torch.utils.tensorboard import SummaryWriter
from mmkit.training.faults import describe_storage_error, is_storage_error
writer = SummaryWriter({str(tmp_path / 'tb')!r})
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
seen = {{}}
def attempt(name, fn):
    try:
        fn()
    except Exception as exc:
        seen[name] = [type(exc).__name__, is_storage_error(exc), describe_storage_error(exc)]
attempt("safetensors", lambda: save_file({{"w": torch.zeros(4096)}}, {str(tmp_path / 'w.safetensors')!r}))
attempt("torch.save", lambda: torch.save({{"w": torch.zeros(4096)}}, {str(tmp_path / 'w.pt')!r}))
def tensorboard():
    writer.add_scalar("loss", 1.0, 1)
    writer.flush()
attempt("tensorboard", tensorboard)
print(json.dumps(seen))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["safetensors"][:2] == ["SafetensorError", True] and "File too large" in seen["safetensors"][2]
    assert seen["torch.save"][:2] == ["RuntimeError", True] and "the disk is full" in seen["torch.save"][2]
    assert seen["tensorboard"][:2] == ["OSError", True] and "File too large" in seen["tensorboard"][2]
    assert not faults.is_storage_error(RuntimeError("shape mismatch"))


@pytest.mark.slow
@pytest.mark.parametrize("kind, says", [
    ("full_in_save", "could not write checkpoint step-00000004"),  # safetensors (before: raw SafetensorError)
    ("full_in_engine_save", "could not write checkpoint step-00000004"),  # torch.save inside DeepSpeed
    ("full_in_log", "could not write the metrics of step 4"),  # metrics.jsonl / TensorBoard
])
def test_a_full_disk_in_any_writer_keeps_the_previous_checkpoint(tiny, tmp_path: Path, monkeypatch, kind, says):
    from drill import TINY_OPTIONS
    from mmkit.training import recipe
    from mmkit.training.config import resolve_config

    out = tmp_path / "run"
    options = {**TINY_OPTIONS, "llm": tiny["llm"], "data": [tiny["data"]], "output_dir": str(out), "max_steps": 6,
               "save_every": 2, "modalities": ["image", "pointcloud"]}
    monkeypatch.setenv(faults.FAULT_ENV, f"{kind}@4")
    with pytest.raises(faults.TrainingError) as failure:
        recipe.train(resolve_config(None, options))
    text = str(failure.value)
    assert says in text and ("File too large" in text or "the disk is full" in text), text
    previous = out / "checkpoints" / "step-00000002"
    assert str(previous) in text and "free space and rerun" in text
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000002"]
    assert not list((out / "checkpoints").glob(".step-*")) and ckpt.verify(previous, 0) is None
    if kind == "full_in_engine_save":  # space freed: the same command resumes from the kept checkpoint
        monkeypatch.delenv(faults.FAULT_ENV)
        summary = recipe.train(resolve_config(None, options))
        assert summary["resumed_from_step"] == 2 and summary["steps"] == 6

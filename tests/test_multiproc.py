"""Multi-process data-parallel training: the same global batches for any process count, a 2-process
loss curve equal to the 1-process one, ZeRO-3 with ranks that see different modalities, and a
change of process count on resume.

The end-to-end tests start real ``mmkit train --num-procs 2`` runs (gloo on CPU) in their own
process group with a time limit: a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mmkit.errors import ConfigError
from mmkit.data.sampler import GlobalBatchSampler, batch_geometry

TIMEOUT = 300


# -- the sampler ----------------------------------------------------------------------------------------
def _steps(samplers: list[GlobalBatchSampler]) -> list[list[int]]:
    """Global batches (all processes' micro-batches of a step, rank by rank)."""
    per_rank = [list(s) for s in samplers]
    accum = samplers[0].grad_accum
    n_steps = len(per_rank[0]) // accum
    return [[i for micro in per_rank for mb in micro[s * accum:(s + 1) * accum] for i in mb] for s in range(n_steps)]


@pytest.mark.parametrize("shuffle", [True, False])
def test_global_batches_do_not_depend_on_the_process_count(shuffle: bool) -> None:
    n, micro, global_batch = 21, 2, 8
    layouts = {}
    for world in (1, 2, 4):
        accum, g = batch_geometry(micro_batch_size=micro, grad_accum=1, global_batch_size=global_batch,
                                  world_size=world)
        assert g == global_batch and accum * micro * world == global_batch
        samplers = [GlobalBatchSampler(n, micro_batch_size=micro, grad_accum=accum, rank=r, world_size=world, seed=3,
                                       shuffle=shuffle) for r in range(world)]
        per_epoch = []
        for epoch in (0, 1):
            for s in samplers:
                s.set_epoch(epoch)
            per_epoch.append(_steps(samplers))
        layouts[world] = per_epoch
        assert all(len(s) == samplers[0].steps_per_epoch * accum for s in samplers)
    assert layouts[1] == layouts[2] == layouts[4]
    for steps in layouts[1]:
        seen = [i for step in steps for i in step]
        assert len(steps) == 3 and len(seen) == 24  # 21 samples padded to whole global batches
        assert set(seen) == set(range(n))
    assert (layouts[1][0] != layouts[1][1]) == shuffle  # reshuffled per epoch, from the seed


def test_resume_position_skips_consumed_steps_without_loading_them() -> None:
    sampler = GlobalBatchSampler(20, micro_batch_size=2, grad_accum=2, rank=1, world_size=2, seed=0)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.set_epoch(1, start_step=3)
    assert list(sampler) == full[3 * 2:] and len(sampler) == len(full) - 6


def test_unshuffled_shards_are_contiguous_per_process() -> None:
    """What the ZeRO-3 test relies on: with shuffle off, process r takes the r-th slice of every global batch."""
    shards = [list(GlobalBatchSampler(8, micro_batch_size=2, grad_accum=1, rank=r, world_size=2, seed=0,
                                      shuffle=False)) for r in (0, 1)]
    assert shards == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]


def test_batch_geometry_errors_name_the_numbers() -> None:
    assert batch_geometry(micro_batch_size=2, grad_accum=3, global_batch_size=None, world_size=2) == (3, 12)
    with pytest.raises(ConfigError, match=r"global_batch_size 6 is not a multiple of micro_batch_size 2 x 2"):
        batch_geometry(micro_batch_size=2, grad_accum=1, global_batch_size=6, world_size=2)


def test_launcher_uses_torchrun_and_shares_the_cores(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from torch.distributed.run import config_from_args, get_args_parser

    from mmkit.training import launch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # restored after: config_from_args sets it when unset
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert launch.thread_limit(4) == 4 and launch.thread_limit(32) == 1
    args = get_args_parser().parse_args(launch.torchrun_args(2, tmp_path / "c.yaml", tmp_path / "logs"))
    args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", "x"
    config, entrypoint, cmd_args = config_from_args(args)
    assert config.nproc_per_node == 2 and config.max_restarts == 0
    assert cmd_args[-3:] == ["-m", "mmkit.training.launch", str(tmp_path / "c.yaml")]


# -- end to end -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(mm_host, tmp_path_factory) -> dict[str, dict[str, str]]:
    from drill import write_tiny_run

    root = tmp_path_factory.mktemp("tiny_multiproc")
    return {layout: write_tiny_run(root, layout=layout) for layout in ("alternate", "pairs")}


def _train(run: dict[str, str], out: Path, *, fault: str | None = None, **options):
    import drill

    env = drill.child_env({"MMKIT_FAULT": fault} if fault else None)
    return drill.run(drill.train_command(run, out, **options), timeout=TIMEOUT, env=env)


def _ok(result) -> None:
    assert result.returncode == 0, result.stdout[-4000:]


COMMON = {"global_batch_size": 4, "max_steps": 6, "save_every": 2, "keep_last": 10}


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory) -> Path:
    """The 1-process reference run (global batch 4: micro-batch 2 x grad_accum 2)."""
    out = tmp_path_factory.mktemp("one_process") / "run"
    _ok(_train(tiny["alternate"], out, num_procs=1, **COMMON))
    return out


@pytest.mark.slow
def test_two_processes_follow_the_one_process_loss_curve(tiny, one_process: Path, tmp_path: Path) -> None:
    from drill import logged_losses, max_weight_diff

    one, two, common = one_process, tmp_path / "two", COMMON
    result = _train(tiny["alternate"], two, num_procs=2, **common)
    _ok(result)
    assert "processes=2 global_batch=4" in result.stdout
    # torch's elastic launcher ran the workers: each rank's output is prefixed and kept in its own log
    assert "[rank0]:" in result.stdout
    logs = {p.parent.name: p for p in (two / "logs").glob("*/attempt_0/*/stdout.log")}
    assert set(logs) == {"0", "1"}
    assert "processes=2 global_batch=4" in logs["0"].read_text()
    loss_one, loss_two = logged_losses(one), logged_losses(two)
    assert sorted(loss_one) == sorted(loss_two) == list(range(1, 7))
    assert max(abs(loss_one[s] - loss_two[s]) for s in loss_one) <= 1e-5
    assert max_weight_diff(one, two) <= 1e-6

    # Process count change under ZeRO stage 0: the 2-process checkpoint at step 2 continues in one
    # process, on the same global batches, to the same weights.
    resumed = tmp_path / "resumed"
    result = _train(tiny["alternate"], resumed, num_procs=1, resume=str(two / "checkpoints" / "step-00000002"),
                    **common)
    _ok(result)
    assert "resuming from" in result.stdout
    assert "2 process(es) with ZeRO stage 0 -> 1 with stage 0" in result.stdout.replace("\n", " ")
    assert max_weight_diff(one, resumed) <= 1e-6
    assert sorted(logged_losses(resumed)) == [3, 4, 5, 6]


@pytest.mark.slow
def test_zero3_with_each_process_seeing_another_modality(tiny, tmp_path: Path) -> None:
    """Process 0 only ever gets images, process 1 only point clouds: each runs the other modality's
    encoder and projector on a blank input (contributing zero), so ZeRO-3's parameter gathers pair
    up; the run finishes and matches the 1-process run on the same global batches."""
    from drill import load_trainable, logged_losses, max_weight_diff

    common = {"global_batch_size": 4, "max_steps": 4, "shuffle": False}
    reference, zero3 = tmp_path / "reference", tmp_path / "zero3"
    _ok(_train(tiny["pairs"], reference, num_procs=1, **common))
    result = _train(tiny["pairs"], zero3, num_procs=2, zero_stage=3, save_every=2, **common)
    _ok(result)
    losses, expected = logged_losses(zero3), logged_losses(reference)
    assert max(abs(losses[s] - expected[s]) for s in expected) <= 1e-5
    assert max_weight_diff(reference, zero3) <= 1e-6

    # checkpoint weights were gathered from the partitions: full shapes, equal to the final model's
    final = load_trainable(zero3)
    at_end = load_trainable(zero3 / "checkpoints" / "step-00000004")
    assert {k: tuple(v.shape) for k, v in at_end.items()} == {k: tuple(v.shape) for k, v in final.items()}
    assert all(v.numel() > 0 for v in at_end.values())
    assert max(float((at_end[k] - final[k]).abs().max()) for k in final) == 0.0

    # the partitioned optimizer state cannot be loaded by another process count: refused, clearly
    moved = tmp_path / "one_process"
    shutil.copytree(zero3 / "checkpoints", moved / "checkpoints")
    result = _train(tiny["pairs"], moved, num_procs=1, zero_stage=3, max_steps=6,
                    **{k: v for k, v in common.items() if k != "max_steps"})
    assert result.returncode == 1, result.stdout[-3000:]
    assert "written by 2 process(es) with ZeRO stage 3; this run has 1" in result.stdout.replace("\n", " ")
    assert "on_world_size_change: reset_optimizer" in result.stdout.replace("\n", " ")
    # ... unless asked to keep the gathered weights, schedule and data position with fresh moments
    result = _train(tiny["pairs"], moved, num_procs=1, zero_stage=3, max_steps=6, on_world_size_change="reset_optimizer",
                    **{k: v for k, v in common.items() if k != "max_steps"})
    _ok(result)
    assert "optimizer moments start again from zero" in result.stdout
    assert sorted(logged_losses(moved)) == [5, 6]
    assert all(bool(v.isfinite().all()) for v in load_trainable(moved).values())


@pytest.mark.slow
def test_zero2_rank_death_then_exact_resume(tiny, one_process: Path, tmp_path: Path) -> None:
    """Process 1 is SIGKILLed at step 3: process 0 reports a failed collective instead of hanging, the
    launcher names the dead process, and rerunning the command resumes (ZeRO-2 optimizer partitions
    included) to the weights of the uninterrupted run on the same global batches."""
    from drill import logged_losses, max_weight_diff

    common = {**COMMON, "num_procs": 2, "zero_stage": 2}
    reference, drilled = one_process, tmp_path / "drilled"
    result = _train(tiny["alternate"], drilled, fault="die@3:1", **common)
    text = result.stdout.replace("\n", " ")
    assert result.returncode == 137, result.stdout[-3000:]
    assert "training process 1 of 2 failed (killed by SIGKILL)" in text
    log = Path(text.split("Its output: ")[1].split()[0].rstrip("."))
    assert log.is_file() and log.name == "stderr.log" and log.parent.name == "1"  # the failed rank's own log
    assert "error (process 0): process 0 of 2: a collective operation failed at step 3" in text
    assert "checkpoints/step-00000002) is intact" in text
    result = _train(tiny["alternate"], drilled, **common)
    _ok(result)
    assert "resuming from" in result.stdout
    assert max_weight_diff(reference, drilled) <= 1e-6
    assert logged_losses(reference) == pytest.approx(logged_losses(drilled), abs=1e-6)


@pytest.mark.slow
def test_zero3_process_whose_micro_batch_lost_every_record_still_takes_part(tiny, tmp_path: Path) -> None:
    """Under --skip-bad-records, process 1's first micro-batch holds only unreadable files: it runs a
    stand-in batch with zero weight so that ZeRO-3's collectives still pair up."""
    import json

    from drill import load_trainable

    records = [json.loads(line) for line in Path(tiny["pairs"]["data"]).read_text().splitlines()]
    for record in records[2:4]:  # process 1's part of the first global batch (shuffle off)
        bad = tmp_path / (Path(record["pointcloud"]).stem + "_corrupt.npy")
        bad.write_bytes(b"not a numpy file")
        record["pointcloud"] = str(bad)
    data = tmp_path / "with_bad_files.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    result = _train({**tiny["pairs"], "data": str(data)}, out, num_procs=2, zero_stage=3, global_batch_size=4,
                    shuffle=False, skip_bad_records=True, max_steps=4, allow_outside_root=True)
    _ok(result)
    assert "samples=16" in result.stdout and "2 skipped records" in result.stdout
    assert all(bool(v.isfinite().all()) for v in load_trainable(out).values())

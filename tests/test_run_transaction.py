"""A run directory is a transaction: one run holds it at a time, and a refused run leaves it exactly
as it was (the rerun drill: a finished demo survives reruns with another seed, other modalities
and a concurrent run, and evaluates exactly as before)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from mmkit.errors import CheckpointMismatchError, ConfigError
from mmkit.training.rundir import LOCK, RunInUseError, RunLock, check_output_dir, same_tree


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) -> sha256 of its bytes."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK}


# -- the lock and the output directory ------------------------------------------------------------------
def test_a_second_lock_is_refused_naming_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = RunLock(out).acquire()
    assert first.created and (out / LOCK).is_file()
    holder = json.loads((out / LOCK).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(RunInUseError, match=rf"in use by another mmkit run \(pid {os.getpid()} on host "
                                            rf"{socket.gethostname()}, started .*\).*Nothing was changed"):
        RunLock(out).acquire()
    first.release()
    second = RunLock(out).acquire()  # free again once released
    second.release()


def test_a_lock_dies_with_its_process(tmp_path: Path) -> None:
    """A killed run never leaves a stale lock: the kernel drops a flock with its last descriptor."""
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'{\"pid\": 1, \"host\": \"elsewhere\"}'); "
            "print('locked', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(out / LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUseError, match=r"pid 1 on host elsewhere"):
            RunLock(out).acquire()
    finally:
        child.kill()
        child.wait()
    RunLock(out).acquire().release()


def test_a_lock_held_after_its_recorded_holder_exited_says_so(tmp_path: Path) -> None:
    """A SIGKILLed run's forked data-loader worker keeps the flock a few seconds after the run's pid is gone."""
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid names a process that has exited
    record = json.dumps({"pid": gone.pid, "host": socket.gethostname()})
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, sys.argv[2].encode()); "
            "print('locked', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(out / LOCK), record], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUseError, match=rf"pid {gone.pid} on host .*that process has exited.*retry"):
            RunLock(out).acquire()
    finally:
        child.kill()
        child.wait()


def test_a_refused_run_removes_the_directory_it_created(tmp_path: Path) -> None:
    out = tmp_path / "new"
    lock = RunLock(out).acquire()
    lock.release(refused=True)
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    lock = RunLock(out).acquire()
    assert not lock.created
    lock.release(refused=True)
    assert (out / "keep.txt").is_file()  # a directory it did not create stays


def test_an_output_dir_that_is_a_file_or_read_only_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ConfigError, match=r"--output-dir .*file is a file; give a directory"):
        check_output_dir(target)
    with pytest.raises(ConfigError, match=r"cannot be created: .*file is a file"):
        RunLock(target / "run").acquire()
    if os.geteuid() != 0:  # root writes anywhere: there the lock's own open reports it instead
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(ConfigError, match=r"is not writable"):
                RunLock(ro).acquire()
        finally:
            ro.chmod(0o755)


def test_same_tree_compares_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "x.bin").write_bytes(b"12345")
    assert same_tree(a, b)
    (b / "sub" / "x.bin").write_bytes(b"12346")
    assert not same_tree(a, b)
    (b / "sub" / "x.bin").write_bytes(b"12345")
    (b / "extra").write_text("")
    assert not same_tree(a, b)


# -- the rerun drill (end to end, in process) ---------------------------------------------------------
DEMO = "audio_example"


@pytest.fixture(scope="module")
def finished_demo(tmp_path_factory, mm_host):
    """A finished demo run (2 steps: it only has to exist and be evaluated)."""
    if DEMO not in mm_host.modalities():
        pytest.skip(f"the {DEMO} plugin is not installed")
    from mmkit.training import recipe
    from mmkit.training.config import resolve_config

    out = tmp_path_factory.mktemp("demo") / "run"
    options = {"modalities": [DEMO], "max_steps": 2, "micro_batch_size": 8, "eval_batch_size": 64,
               "output_dir": str(out), "num_workers": 0}
    summary = recipe.train(resolve_config(None, options))
    return out, options, summary


@pytest.mark.slow
def test_refused_reruns_leave_a_finished_demo_exactly_as_it_was(finished_demo, mm_host) -> None:
    from mmkit.evaluation.evaluate import evaluate_run
    from mmkit.training import recipe
    from mmkit.training.config import resolve_config

    out, options, summary = finished_demo
    before = snapshot(out)
    assert "config.yaml" in before and "eval.json" in before and "demo_data/base_llm/model.safetensors" in before

    def rerun(**changes):
        recipe.train(resolve_config(None, {**options, **changes}))

    # another seed: the checkpoint belongs to another run (before: demo_data and config.yaml rewritten)
    with pytest.raises(CheckpointMismatchError, match=r"different training run \(seed: checkpoint 0, now 1\)"):
        rerun(seed=1)
    # other modalities
    with pytest.raises(CheckpointMismatchError, match=r"modalities: checkpoint \['audio_example'\], now \['image'\]"):
        rerun(modalities=["image"])
    # a concurrent run (this process holds the lock, as a running `mmkit train` would)
    fd = os.open(out / LOCK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, json.dumps({"pid": 4242, "host": "trainer-7"}).encode(), 0)
    try:
        with pytest.raises(RunInUseError, match=r"in use by another mmkit run \(pid 4242 on host trainer-7\)"):
            rerun(max_steps=4)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    # the checkpoints gone, the finished model would be replaced by a fresh run
    moved = out.parent / "no_checkpoints"
    shutil.copytree(out, moved)
    shutil.rmtree(moved / "checkpoints")
    kept = snapshot(moved)
    with pytest.raises(ConfigError, match=r"holds a finished model .* no checkpoint to continue from"):
        rerun(output_dir=str(moved), seed=1)
    assert snapshot(moved) == kept

    assert snapshot(out) == before  # not one byte changed, no staging directory left
    # the finished model evaluates exactly as before: the same scores, the same eval.json
    results = evaluate_run(out, {DEMO: out / "demo_data" / f"test_{DEMO}.jsonl"},
                           chance={DEMO: summary["eval"][DEMO]["chance"]}, batch_size=64,
                           max_new_tokens=options.get("eval_max_new_tokens", 4), host=mm_host)
    assert results == summary["eval"]
    assert snapshot(out)["eval.json"] == before["eval.json"]


@pytest.mark.slow
def test_the_same_command_again_is_accepted_without_rewriting_the_demo(finished_demo) -> None:
    from mmkit.training import recipe
    from mmkit.training.config import resolve_config

    out, options, _ = finished_demo
    copy = out.parent / "again"
    shutil.copytree(out, copy)
    demo_before = snapshot(copy / "demo_data")
    inode = (copy / "demo_data" / "base_llm" / "model.safetensors").stat().st_ino
    summary = recipe.train(resolve_config(None, {**options, "output_dir": str(copy)}))
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 2
    assert snapshot(copy / "demo_data") == demo_before
    assert (copy / "demo_data" / "base_llm" / "model.safetensors").stat().st_ino == inode  # not even replaced
    assert not [p for p in copy.iterdir() if p.name.startswith(".demo_data")]

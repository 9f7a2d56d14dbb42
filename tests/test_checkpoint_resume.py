"""Checkpoints and exact resume: a run SIGKILLed at a random step (or in the middle of a save) and
restarted with the same command ends with the weights of an uninterrupted run; what a checkpoint
holds; verification before loading; refusing a checkpoint of another run."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from mmkit.errors import CheckpointMismatchError, ConfigError
from mmkit.training import checkpoint as ckpt
from mmkit.training.checkpoint.manifest import write_manifest

TIMEOUT = 300
#: DeepSpeed's engine, whose torch.save files the safe-loading tests plant and read; the plain torch
#: step's checkpoints (safetensors + JSON) and exact resume: tests/test_optim_step.py.
OPTIONS = {"max_steps": 8, "save_every": 2, "keep_last": 2, "optimizer_step": "deepspeed"}


@pytest.fixture(scope="module")
def tiny(mm_host, tmp_path_factory) -> dict[str, str]:
    from drill import write_tiny_run

    return write_tiny_run(tmp_path_factory.mktemp("tiny_ckpt"))


def _train(run: dict[str, str], out: Path, *, fault: str | None = None, **options):
    import drill

    env = drill.child_env({"MMKIT_FAULT": fault} if fault else None)
    return drill.run(drill.train_command(run, out, **{**OPTIONS, **options}), timeout=TIMEOUT, env=env)


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = _train(tiny, out)
    assert result.returncode == 0, result.stdout[-4000:]
    return out


# -- end to end ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_exact(tiny, uninterrupted: Path, tmp_path: Path) -> None:
    import drill

    rng = random.Random()
    step, delay = rng.randint(2, 6), rng.uniform(0.0, 0.15)
    out = tmp_path / "killed"
    cmd = drill.train_command(tiny, out, **OPTIONS)
    reached = drill.kill_at_step(cmd, out, step, delay_s=delay, timeout=TIMEOUT)
    assert reached >= step, f"the run ended before the kill at step {step}"

    result = drill.run(cmd, timeout=TIMEOUT)  # the same command: resumes automatically
    assert result.returncode == 0, result.stdout[-4000:]
    diff = drill.max_weight_diff(uninterrupted, out)
    assert diff <= 1e-6, f"killed after step {step} (+{delay:.2f}s): weights differ by {diff}"
    # the metrics after the checkpoint were logged again, not twice
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 9))
    assert drill.logged_losses(out) == drill.logged_losses(uninterrupted)


@pytest.mark.slow
def test_kill_during_a_save_keeps_the_previous_checkpoint(tiny, uninterrupted: Path, tmp_path: Path) -> None:
    import drill

    out = tmp_path / "run"
    result = _train(tiny, out, fault="kill_in_save@4")
    assert result.returncode == -9, result.stdout[-3000:]
    root = out / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000002"]
    assert (root / ".step-00000004.tmp").is_dir()  # the half-written one, never visible as a checkpoint
    assert ckpt.verify(root / "step-00000002", 0) is None

    result = _train(tiny, out)
    assert result.returncode == 0, result.stdout[-4000:]
    assert f"resuming from {root / 'step-00000002'}" in result.stdout
    assert not list(root.glob(".step-*"))  # leftovers cleaned by the next save
    assert drill.max_weight_diff(uninterrupted, out) <= 1e-6


@pytest.mark.slow
def test_checkpoint_contents(uninterrupted: Path) -> None:
    from safetensors import safe_open

    from mmkit.modeling.persistence import load_weights, read_meta
    from drill import load_trainable

    root = uninterrupted / "checkpoints"
    kept = ckpt.list_checkpoints(uninterrupted)
    assert [p.name for p in kept] == ["step-00000008", "step-00000006"]  # keep_last 2, the end included
    assert (root / "latest").read_text().strip() == "step-00000008"
    last = kept[0]
    manifest = json.loads((last / "manifest.json").read_text())
    on_disk = {p.relative_to(last).as_posix() for p in last.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert {"trainer_state.json", "model/trainable.safetensors", "model/mmkit.json", "rng/rank-00000.safetensors",
            "deepspeed/mp_rank_00_model_states.pt"} <= on_disk
    state = json.loads((last / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (8, 1, 0)  # 16 samples / 2 per step
    assert state["global_batch_size"] == 2 and state["world_size"] == 1 and state["num_samples"] == 16
    assert state["scheduler"]["last_epoch"] == 8
    assert state["config"]["lora_r"] == 4 and state["trainable"]
    # the checkpoint's model/ is an ordinary model directory, and holds the final weights
    meta = read_meta(last / "model")
    weights = load_weights(last / "model", "trainable.safetensors", meta)
    final = load_trainable(uninterrupted)
    assert max(float((weights[k] - final[k]).abs().max()) for k in final) == 0.0
    with safe_open(str(last / "rng" / "rank-00000.safetensors"), framework="pt") as fh:
        assert {"torch", "numpy.keys"} <= set(fh.keys()) and {"python", "numpy"} <= set(fh.metadata())


# -- choosing a checkpoint (in process: no process group, the collectives are no-ops) ------------------------
@pytest.mark.slow
def test_a_corrupt_checkpoint_is_never_loaded_and_an_older_one_is_used(uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    newest = out / "checkpoints" / "step-00000008"
    states = newest / "deepspeed" / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the hash can tell
    states.write_bytes(bytes(data))
    assert "does not match its sha256" in ckpt.verify(newest, 0)

    import logging

    from mmkit.training.logs import log

    printed: list[str] = []

    class Collect(logging.Handler):  # on the logger itself: logs.setup may have stopped propagation to pytest's
        def emit(self, record: logging.LogRecord) -> None:
            printed.append(f"{record.levelname} {record.getMessage()}")

    candidates, explicit = ckpt.resume_candidates("auto", out)
    assert [c.name for c in candidates] == ["step-00000008", "step-00000006"] and not explicit
    handler = Collect()
    log.addHandler(handler)
    try:
        chosen = ckpt.choose_checkpoint(candidates, explicit, rank=0)
    finally:
        log.removeHandler(handler)
    assert chosen == out / "checkpoints" / "step-00000006"
    assert printed[0].startswith("WARNING checkpoint ") and "failed verification" in printed[0]
    assert "trying an older one" in printed[0]
    with pytest.raises(CheckpointMismatchError, match="failed verification"):
        ckpt.choose_checkpoint(*ckpt.resume_candidates(str(newest), out), rank=0)
    (newest / "rng" / "rank-00000.safetensors").unlink()
    assert "missing rng/rank-00000.safetensors" in ckpt.verify(newest, 0)


@pytest.mark.slow
def test_resume_option_values(uninterrupted: Path, tmp_path: Path) -> None:
    assert ckpt.resume_candidates("never", uninterrupted) == ([], False)
    found, explicit = ckpt.resume_candidates(str(uninterrupted), tmp_path)  # a run directory
    assert explicit and [p.name for p in found] == ["step-00000008", "step-00000006"]
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        ckpt.resume_candidates(str(tmp_path), tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(uninterrupted / "checkpoints", copy / "checkpoints")
    assert ckpt.discard_checkpoints(copy) == 2 and ckpt.list_checkpoints(copy) == []


def _saved(uninterrupted: Path) -> dict:
    return ckpt.read_state(uninterrupted / "checkpoints" / "step-00000008")


def _check(saved: dict, *, world: int = 1, policy: str = "refuse", **changes):
    config = {**saved["config"], **changes}
    geometry = {k: saved[k] for k in ("micro_batch_size", "grad_accum", "global_batch_size", "num_samples")}
    return ckpt.check_resumable(saved, config=config, world_size=world, geometry=geometry,
                                trainable=saved["trainable"], on_world_size_change=policy)


@pytest.mark.slow
def test_a_checkpoint_of_another_run_is_refused_by_name(uninterrupted: Path) -> None:
    saved = _saved(uninterrupted)
    assert _check(saved) == ("exact", [])
    with pytest.raises(CheckpointMismatchError, match=r"different training run \(lora_r: checkpoint 4, now 8"):
        _check(saved, lora_r=8)
    with pytest.raises(CheckpointMismatchError, match="different training run .*seed"):
        _check(saved, seed=1)
    mode, notes = _check(saved, lr=5e-4, max_steps=20)  # a longer or gentler schedule may continue
    assert mode == "exact" and any(n.startswith("lr changed") for n in notes) and any("max_steps" in n for n in notes)
    # either engine resumes the other's ZeRO-0 checkpoint; the switch is said, not silent
    assert _check(saved, optimizer_step="torch")[1] == ["optimizer_step changed: checkpoint 'deepspeed', now 'torch'"]
    geometry = {"micro_batch_size": 2, "grad_accum": 2, "global_batch_size": 4, "num_samples": 16}
    with pytest.raises(CheckpointMismatchError, match="global batch differs.*global_batch_size: 2"):
        ckpt.check_resumable(saved, config=saved["config"], world_size=1, geometry=geometry,
                             trainable=saved["trainable"], on_world_size_change="refuse")
    trainable = dict(saved["trainable"])
    dropped = sorted(trainable)[0]
    del trainable[dropped]
    trainable["llm.extra.lora_A.weight"] = [2, 2]
    with pytest.raises(CheckpointMismatchError, match=f"parameters differ .*only in the checkpoint: {dropped}"):
        ckpt.check_resumable(saved, config=saved["config"], world_size=1, geometry={
            k: saved[k] for k in ("micro_batch_size", "grad_accum", "global_batch_size", "num_samples")},
            trainable=trainable, on_world_size_change="refuse")


def test_restored_hyperparameters_follow_this_runs_configuration() -> None:
    """Unchanged options give back the very rates saved; a changed lr or weight decay replaces the
    restored one at the same point of the schedule."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from mmkit.training.checkpoint.resume import Hyperparameters

    def schedule(lr: float, weight_decay: float, total: int = 10):
        params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))]
        groups = [{"params": params[:1], "lr": 2 * lr}, {"params": params[1:], "lr": lr}]  # projectors, LoRA
        return get_cosine_schedule_with_warmup(torch.optim.AdamW(groups, weight_decay=weight_decay), 2, total)

    saved = schedule(1e-3, 0.0)
    for _ in range(5):
        saved.optimizer.step()
        saved.step()
    state = (saved.optimizer.state_dict(), saved.state_dict())
    saved_lrs = [g["lr"] for g in saved.optimizer.param_groups]
    for lr, weight_decay, total in [(1e-3, 0.0, 10), (3e-3, 0.1, 10), (1e-3, 0.0, 20)]:
        resumed = schedule(lr, weight_decay, total)
        configured = Hyperparameters.of(resumed)
        resumed.optimizer.load_state_dict(state[0])
        resumed.load_state_dict(state[1])
        configured.restore(resumed)
        groups = resumed.optimizer.param_groups
        fresh = schedule(lr, weight_decay, total)  # the rates this configuration gives at step 5
        for _ in range(5):
            fresh.optimizer.step()
            fresh.step()
        assert [g["lr"] for g in groups] == [g["lr"] for g in fresh.optimizer.param_groups] == resumed.get_last_lr()
        assert [g["weight_decay"] for g in groups] == [weight_decay] * 2
        if (lr, weight_decay, total) == (1e-3, 0.0, 10):
            assert [g["lr"] for g in groups] == saved_lrs  # bit for bit: an exact resume stays exact


@pytest.mark.slow
def test_a_changed_learning_rate_and_weight_decay_apply_after_resuming(tiny, uninterrupted: Path,
                                                                       tmp_path: Path) -> None:
    """The optimizer's and schedule's saved state hold the old lr and weight decay; a resumed run that
    reports them changed trains with the new ones (from the same point of the schedule)."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    shutil.rmtree(out / "checkpoints" / "step-00000008")
    shutil.rmtree(out / "model")
    result = _train(tiny, out, lr=3e-3, weight_decay=0.1, optimizer_step="torch")  # drill's lr: 1e-3
    assert result.returncode == 0, result.stdout[-4000:]
    assert "lr changed: checkpoint 0.001, now 0.003" in result.stdout

    def logged_lr(run: Path) -> dict[int, float]:
        entries = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return {e["step"]: e["lr"] for e in entries if "lr" in e}

    before, after = logged_lr(uninterrupted), logged_lr(out)
    assert [after[s] for s in (1, 6)] == [before[s] for s in (1, 6)]
    assert after[7] == pytest.approx(3 * before[7], rel=1e-9) and before[7] > 0
    engine = json.loads((out / "checkpoints" / "step-00000008" / "deepspeed" / "engine.json").read_text())
    assert [(g["initial_lr"], g["weight_decay"]) for g in engine["param_groups"]] == [(3e-3, 0.1)] * 2


@pytest.mark.slow
def test_process_count_change_policy(uninterrupted: Path) -> None:
    saved = _saved(uninterrupted)
    mode, notes = _check(saved, world=2)  # ZeRO 0: the optimizer state is whole
    assert mode == "exact" and "not partitioned" in notes[0]
    zero2 = {**saved, "zero_stage": 2, "config": {**saved["config"], "zero_stage": 2}}
    with pytest.raises(CheckpointMismatchError, match=r"written by 1 process\(es\) with ZeRO stage 2; this run has 2"):
        _check(zero2, world=2)
    mode, notes = _check(zero2, world=2, policy="reset_optimizer")
    assert mode == "reset_optimizer" and "optimizer moments start again from zero" in notes[0]
    with pytest.raises(CheckpointMismatchError, match="ZeRO stage 2; this run has 1 with stage 3"):
        _check(zero2, zero_stage=3)


def test_trim_metrics_keeps_steps_up_to_the_checkpoint(tmp_path: Path) -> None:
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 6)] + ['{"step": 6, "lo']  # cut by a kill
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    ckpt.trim_metrics(tmp_path, 3)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_trim_metrics_drops_the_end_summary_a_rerun_writes_again(tmp_path: Path) -> None:
    # a finished run rerun (resume at its last step) must not append a second summary line per rerun
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2)] + [json.dumps({"step": 2, "skipped_records": 0})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    ckpt.trim_metrics(tmp_path, 2)
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0}]


# -- trust: tampering, unpickling, signatures ------------------------------------------------------------------
class _Planted:
    """Unpickling this runs code: it creates the file named in ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _rehash(checkpoint: Path) -> None:
    """What a tamperer does: recompute the manifest's sha256 and sizes (no key: unsigned)."""
    from mmkit.modeling.persistence import sha256

    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for rel in manifest["files"]:
        manifest["files"][rel] = {"sha256": sha256(checkpoint / rel), "size": (checkpoint / rel).stat().st_size}
    manifest.pop("signature", None)
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow
def test_a_planted_pickle_with_a_recomputed_manifest_is_refused_and_never_runs(tiny, uninterrupted: Path,
                                                                                  tmp_path: Path) -> None:
    """Before: DeepSpeed's torch.load(weights_only=False) ran the planted code."""
    import torch

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    marker = tmp_path / "planted-code-ran"
    for step in ("step-00000006", "step-00000008"):
        checkpoint = out / "checkpoints" / step
        torch.save({"module": _Planted(str(marker))}, checkpoint / "deepspeed" / "mp_rank_00_model_states.pt")
        _rehash(checkpoint)
        assert ckpt.verify(checkpoint, 0) is None  # the manifest alone cannot tell
    result = _train(tiny, out, max_steps=10)
    assert result.returncode == 1, result.stdout[-3000:]
    text = result.stdout.replace("\n", " ")
    assert "mp_rank_00_model_states.pt: loading it needs full unpickling, which can run code" in text
    assert "--trust-checkpoint" in text and "Traceback" not in text
    assert not marker.exists()
    # the same mechanism in process, exactly as DeepSpeed calls it
    with pytest.raises(CheckpointMismatchError, match=r"needs full unpickling, which can run code stored in the file \(it holds "), \
            ckpt.safe_torch_load():
        torch.load(out / "checkpoints" / "step-00000008" / "deepspeed" / "mp_rank_00_model_states.pt",
                   weights_only=False)
    assert not marker.exists()


@pytest.mark.slow
def test_deepspeed_state_loads_with_weights_only(uninterrupted: Path) -> None:
    import torch

    states = uninterrupted / "checkpoints" / "step-00000008" / "deepspeed" / "mp_rank_00_model_states.pt"
    with ckpt.safe_torch_load():
        state = torch.load(states, weights_only=False)  # DeepSpeed's call: made safe
    assert state["optimizer"]["state"] and state["global_steps"] == 8


@pytest.mark.slow
def test_manifest_signatures(uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = tmp_path / "step-00000008"
    shutil.copytree(uninterrupted / "checkpoints" / "step-00000008", checkpoint)
    monkeypatch.setenv(ckpt.KEY_ENV, "team secret")
    assert "is not signed, and MMKIT_CHECKPOINT_KEY is set" in ckpt.verify(checkpoint, 0)
    (checkpoint / "manifest.json").unlink()
    write_manifest(checkpoint, 8)  # as a save with the key set writes it
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["signature"]["algorithm"] == "hmac-sha256"
    assert ckpt.verify(checkpoint, 0) is None
    monkeypatch.setenv(ckpt.KEY_ENV, "another key")
    assert "bad signature" in ckpt.verify(checkpoint, 0)
    monkeypatch.setenv(ckpt.KEY_ENV, "team secret")
    state = checkpoint / "trainer_state.json"
    state.write_text(state.read_text().replace('"seed": 0', '"seed": 1'))
    _rehash(checkpoint)  # a tamperer without the key
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["signature"] = {"algorithm": "hmac-sha256", "value": "0" * 64}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    assert "bad signature" in ckpt.verify(checkpoint, 0)
    monkeypatch.delenv(ckpt.KEY_ENV)
    assert ckpt.verify(checkpoint, 0) is None  # without a key, a manifest vouches for integrity only


@pytest.mark.slow
def test_the_manifest_reuses_the_weights_hashes_of_mmkit_json(uninterrupted: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A save reads each file once: the weights were hashed into model/mmkit.json as they were written."""
    from mmkit.modeling import persistence
    from mmkit.training.checkpoint.store import _model_hashes

    checkpoint = tmp_path / "step-00000008"
    shutil.copytree(uninterrupted / "checkpoints" / "step-00000008", checkpoint)
    saved = json.loads((checkpoint / "manifest.json").read_text())["files"]
    (checkpoint / "manifest.json").unlink()
    hashed, real = [], persistence.sha256
    monkeypatch.setattr(persistence, "sha256", lambda path: hashed.append(Path(path).name) or real(path))
    known = _model_hashes(checkpoint / "model")
    assert "model/trainable.safetensors" in known
    write_manifest(checkpoint, 8, known)
    assert "trainable.safetensors" not in hashed and len(hashed) == len(set(hashed))
    assert json.loads((checkpoint / "manifest.json").read_text())["files"] == saved
    assert ckpt.verify(checkpoint, 0) is None


@pytest.mark.slow
@pytest.mark.parametrize("content, reason", [
    ("[1, 2]", "manifest.json is a JSON list, not the object mmkit writes"),
    ('{"format": 1, "files": [1]}', "no valid 'files' table"),
    ('{"format": 1, "files": {"../x": {"sha256": "0", "size": 1}}}', "outside the checkpoint"),
])
def test_malformed_manifests_are_refused_by_reason(uninterrupted: Path, tmp_path: Path, content, reason) -> None:
    checkpoint = tmp_path / "step-00000008"
    shutil.copytree(uninterrupted / "checkpoints" / "step-00000008", checkpoint)
    if "../x" in content:
        files = {p.relative_to(checkpoint).as_posix(): {"sha256": "0", "size": 1}
                 for p in checkpoint.rglob("*") if p.is_file() and p.name != "manifest.json"}
        content = json.dumps({"format": 1, "files": {**files, "../x": {"sha256": "0", "size": 1}}})
    (checkpoint / "manifest.json").write_text(content)
    assert reason in ckpt.verify(checkpoint, 0)


@pytest.mark.slow
def test_a_file_the_manifest_does_not_list_is_refused(uninterrupted: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "step-00000008"
    shutil.copytree(uninterrupted / "checkpoints" / "step-00000008", checkpoint)
    (checkpoint / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"planted")
    assert "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt is not listed" in ckpt.verify(checkpoint, 0)


@pytest.mark.slow
def test_resuming_on_another_base_model_is_refused_before_anything_is_written(uninterrupted: Path, tmp_path: Path,
                                                                               mm_host) -> None:
    from mmkit.training.config import TrainConfig
    from mmkit.training.rundir import admit

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    saved = _saved(uninterrupted)["config"]
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k != "output_dir"}, output_dir=str(out))
    assert admit(cfg, mm_host, cfg.modalities, prepare_demo=None).notes == []  # the same base: admitted
    for step in ("step-00000006", "step-00000008"):  # as if the base's weights had been replaced in place
        meta_path = out / "checkpoints" / step / "model" / "mmkit.json"
        meta = json.loads(meta_path.read_text())
        meta["llm"]["fingerprint"]["weights"] = "0" * 64
        meta_path.write_text(json.dumps(meta))
    before = sorted(p.as_posix() for p in out.rglob("*"))
    with pytest.raises(CheckpointMismatchError, match=r"same shapes, but its weights differ.*--allow-different-base"):
        admit(cfg, mm_host, cfg.modalities, prepare_demo=None)
    assert sorted(p.as_posix() for p in out.rglob("*")) == before
    import attrs

    notes = admit(attrs.evolve(cfg, allow_base_mismatch=True), mm_host, cfg.modalities, prepare_demo=None).notes
    assert any("weights differ" in n and "allowed by --allow-different-base" in n for n in notes)

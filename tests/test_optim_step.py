"""The plain torch optimizer step (mmkit/training/optim.py) against DeepSpeed's engine: the same losses
and weights (gradient accumulation, clipping, weight decay, the LR schedule, parameters without a
gradient), checkpoints in safetensors + JSON that resume exactly, and checkpoints of either engine
loaded by the other (ZeRO stage 0). End to end: the demo's first losses are the same with either
engine, and a plain-step run SIGKILLed at a random step resumes to the uninterrupted run's weights."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from mmkit.errors import ConfigError
from mmkit.training import optim

GRAD_ACCUM, LR, STEPS = 2, 5e-2, 6


class Tiny(torch.nn.Module):
    """Two trainable layers and a frozen one; ``unused`` never gets a gradient."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 1)
        self.frozen = torch.nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.unused = torch.nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self.b(torch.tanh(self.a(self.frozen(x)))), y) * 50


def _groups(model: Tiny) -> list[dict]:
    return [{"params": list(model.a.parameters()) + [model.unused], "lr": LR},
            {"params": list(model.b.parameters()), "lr": LR / 2}]


def _schedule(opt):
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(opt, 2, 20)


def _data(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)) for _ in range(n)]


def _plain(model: Tiny) -> optim.PlainEngine:
    return optim.PlainEngine(model, _groups(model), lr=LR, weight_decay=0.1, max_grad_norm=0.5, grad_accum=GRAD_ACCUM,
                             device=torch.device("cpu"), lr_scheduler=_schedule)


def _deepspeed(model: Tiny):
    import deepspeed

    from mmkit.training.distributed import init_distributed

    init_distributed(60.0)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": GRAD_ACCUM,
              "train_batch_size": 4 * GRAD_ACCUM, "gradient_clipping": 0.5, "zero_optimization": {"stage": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.1, "betas": [0.9, 0.999],
                                                        "eps": 1e-8, "torch_adam": True}},
              "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=_groups(model), config=config,
                                           lr_scheduler=_schedule)
    return engine


def _train(engine, data) -> list[float]:
    losses = []
    for x, y in data:
        loss = engine(x, y)
        losses.append(float(loss.detach()))
        engine.backward(loss)
        engine.step()
    return losses


def _weights(model: Tiny) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_the_plain_step_follows_deepspeed_and_is_chosen_only_where_deepspeed_adds_nothing() -> None:
    data = _data(STEPS * GRAD_ACCUM)
    ds_model, plain_model = Tiny(), Tiny()
    ds_losses, plain_losses = _train(_deepspeed(ds_model), data), _train(_plain(plain_model), data)
    assert plain_losses == pytest.approx(ds_losses, rel=1e-6, abs=1e-7)
    for name, value in _weights(ds_model).items():
        assert torch.allclose(_weights(plain_model)[name], value, rtol=0, atol=1e-6), name
    assert not torch.equal(plain_model.unused, torch.ones(3))  # no gradient, yet decayed: as DeepSpeed does

    assert optim.use_plain_step("auto", world_size=1, zero_stage=0, precision="fp32")
    for world, stage, precision in ((2, 0, "fp32"), (1, 2, "fp32"), (1, 0, "bf16"), (1, 0, "fp16")):
        assert not optim.use_plain_step("auto", world_size=world, zero_stage=stage, precision=precision)
        with pytest.raises(ConfigError, match="optimizer_step: torch needs one process, ZeRO stage 0 and fp32"):
            optim.use_plain_step("torch", world_size=world, zero_stage=stage, precision=precision)
    assert not optim.use_plain_step("deepspeed", world_size=1, zero_stage=0, precision="fp32")


def test_plain_checkpoints_are_safetensors_and_json_and_resume_exactly(tmp_path: Path) -> None:
    from mmkit.training.checkpoint import safe_torch_load

    data = _data(STEPS * GRAD_ACCUM)
    half = STEPS // 2 * GRAD_ACCUM
    straight = Tiny()
    _train(_plain(straight), data)

    first = Tiny()
    engine = _plain(first)
    _train(engine, data[:half])
    engine.save_checkpoint(str(tmp_path), tag="state", exclude_frozen_parameters=True)
    files = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert files == [optim.STATE_FILE, optim.OPTIMIZER_FILE, optim.MODULE_FILE]  # no pickle anywhere
    meta = json.loads((tmp_path / "state" / optim.STATE_FILE).read_text())
    assert meta["global_steps"] == STEPS // 2 and meta["lr_scheduler"]["last_epoch"] == STEPS // 2

    resumed_model = Tiny()  # fresh weights: the checkpoint brings the trained ones back
    resumed = _plain(resumed_model)
    with safe_torch_load():
        path, _ = resumed.load_checkpoint(str(tmp_path), tag="state")
    assert path == str(tmp_path / "state") and resumed.global_steps == STEPS // 2
    _train(resumed, data[half:])
    for name, value in _weights(straight).items():
        assert torch.equal(_weights(resumed_model)[name], value), name
    assert resumed.load_checkpoint(str(tmp_path), tag="absent") == (None, None)


def test_either_engine_resumes_the_others_zero0_checkpoint(tmp_path: Path) -> None:
    from mmkit.training.checkpoint import safe_torch_load

    data = _data(STEPS * GRAD_ACCUM)
    half = STEPS // 2 * GRAD_ACCUM
    straight = Tiny()
    _train(_plain(straight), data)

    # DeepSpeed wrote it (several processes at ZeRO 0), the plain step continues (one process)
    ds = _deepspeed(Tiny())
    _train(ds, data[:half])
    ds.save_checkpoint(str(tmp_path / "ds"), tag="state", save_latest=False, exclude_frozen_parameters=True)
    plain_model = Tiny()
    plain = _plain(plain_model)
    with safe_torch_load():  # DeepSpeed's torch.save file, read with weights_only
        plain.load_checkpoint(str(tmp_path / "ds"), tag="state")
    _train(plain, data[half:])

    # the plain step wrote it, DeepSpeed continues
    first = _plain(Tiny())
    _train(first, data[:half])
    first.save_checkpoint(str(tmp_path / "plain"), tag="state")
    ds_model = Tiny()
    ds = _deepspeed(ds_model)
    optim.accept_plain_checkpoints(ds)
    path, _ = ds.load_checkpoint(str(tmp_path / "plain"), tag="state", load_module_strict=False)
    assert path == str(tmp_path / "plain" / "state") and ds.global_steps == STEPS // 2
    _train(ds, data[half:])
    for name, value in _weights(straight).items():
        assert torch.allclose(_weights(plain_model)[name], value, rtol=0, atol=1e-6), name
        assert torch.allclose(_weights(ds_model)[name], value, rtol=0, atol=1e-6), name


# -- end to end ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_demo_losses_are_the_same_with_either_engine(tmp_path: Path, mm_host) -> None:
    from mmkit.training import recipe
    from mmkit.training.config import resolve_config

    demo = "audio_example"
    if demo not in mm_host.modalities():
        pytest.skip(f"the {demo} plugin is not installed")
    losses = {}
    for choice in ("deepspeed", "torch"):
        out = tmp_path / choice
        recipe.train(resolve_config(None, {"modalities": [demo], "max_steps": 8, "log_every": 1, "eval_data": [],
                                           "output_dir": str(out), "optimizer_step": choice, "tensorboard": False}))
        losses[choice] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                          if '"loss"' in line]
    assert len(losses["torch"]) == 8
    assert losses["torch"] == pytest.approx(losses["deepspeed"], rel=1e-5)


@pytest.mark.slow
def test_a_plain_step_run_killed_at_a_random_step_resumes_exactly(mm_host, tmp_path: Path) -> None:
    import drill

    tiny = drill.write_tiny_run(tmp_path / "data")
    options = {"max_steps": 8, "save_every": 2, "keep_last": 2, "optimizer_step": "torch"}
    uninterrupted = tmp_path / "uninterrupted"
    result = drill.run(drill.train_command(tiny, uninterrupted, **options), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "optimizer=torch" in result.stdout

    step, delay = random.randint(2, 6), random.uniform(0.0, 0.15)
    out = tmp_path / "killed"
    cmd = drill.train_command(tiny, out, **options)
    assert drill.kill_at_step(cmd, out, step, delay_s=delay, timeout=300) >= step
    result = drill.run(cmd, timeout=300)  # the same command resumes
    assert result.returncode == 0, result.stdout[-3000:]
    assert drill.max_weight_diff(uninterrupted, out) <= 1e-6, f"killed after step {step} (+{delay:.2f}s)"
    assert drill.logged_losses(out) == drill.logged_losses(uninterrupted)
    kept = out / "checkpoints" / "step-00000008" / "deepspeed"
    assert sorted(p.suffix for p in kept.iterdir()) == [".json", ".safetensors", ".safetensors"]

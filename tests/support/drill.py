"""Fault drills: tiny training runs that are killed and resumed, for the test suite and
``benchmarks/fault_drill.py`` (it lives with the tests: core tests import nothing from benchmarks/).

:func:`write_tiny_run` writes a tiny LLaMA-architecture LM and a small image + point-cloud data
set (needs the ``image`` and ``pointcloud`` plugins); :func:`train_command` builds the ``mmkit
train`` command line for it; :func:`kill_at_step` runs a command and SIGKILLs its whole process
group once ``metrics.jsonl`` reaches a step; :func:`max_weight_diff` compares two runs' trainable
weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORDS = ("red", "blue", "green", "cube", "sphere", "cone")
CORPUS = "What is shown here ? Which shape is it ? " + " ".join(WORDS)


def write_tiny_run(root: Path, *, samples: int = 16, layout: str = "alternate", seed: int = 0) -> dict[str, str]:
    """Write ``root/llm`` and ``root/train.jsonl`` (half images, half point clouds); returns the
    ``llm`` and ``data`` paths.

    ``layout="alternate"``: image, point cloud, image, ...; ``layout="pairs"``: two images, two
    point clouds, two images, ... so that with ``shuffle: false``, two processes and a micro-batch
    of 2, process 0 only ever sees images and process 1 only point clouds.
    """
    import numpy as np
    from PIL import Image

    from mmkit.demo.llm import build_tiny_llm

    root = Path(root)
    files = root / "inputs"
    files.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, clouds = [], []
    for i in range(samples // 2):
        img = files / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)).save(img)
        images.append({"id": f"img-{i}", "image": str(img), "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown here ?"}, {"from": "gpt", "value": WORDS[i % 3]}]})
        cloud = files / f"pcl{i}.npy"
        np.save(cloud, rng.normal(size=(300, 3)).astype(np.float32))
        clouds.append({"id": f"pcl-{i}", "pointcloud": str(cloud), "conversations": [
            {"from": "human", "value": "<pointcloud>\nWhich shape is it ?"},
            {"from": "gpt", "value": WORDS[3 + i % 3]}]})
    if layout == "alternate":
        records = [r for pair in zip(images, clouds) for r in pair]
    elif layout == "pairs":
        records = []
        for k in range(0, len(images), 2):
            records += images[k:k + 2] + clouds[k:k + 2]
    else:
        raise ValueError(f"layout {layout!r}: use alternate or pairs")
    data = root / f"train_{layout}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    llm = root / "llm"
    if not (llm / "config.json").is_file():
        build_tiny_llm(llm, [CORPUS], hidden_size=32, num_layers=1, num_heads=2, seed=seed)
    return {"llm": str(llm), "data": str(data)}


#: Options of a tiny deterministic run (no dropout, one thread, a log line every step).
TINY_OPTIONS: dict[str, Any] = {
    "modalities": "image,pointcloud", "micro_batch_size": 2, "max_steps": 6, "lora_dropout": 0.0,
    "lora_r": 4, "lora_alpha": 8, "num_threads": 1, "tensorboard": False, "log_every": 1, "lr": 1e-3,
    "warmup_ratio": 0.0,
}


def train_command(run: dict[str, str], output_dir: Path, **options: Any) -> list[str]:
    """``python -c 'mmkit main' train --llm ... --data ... --output-dir ... --set key=value ...``."""
    values = {**TINY_OPTIONS, **options}
    cmd = [sys.executable, "-c", "from mmkit_cli.main import main; main()", "train", "--llm", run["llm"],
           "--data", run["data"], "--output-dir", str(output_dir)]
    for key, value in values.items():
        if value is None:
            continue
        text = json.dumps(value) if isinstance(value, bool) else str(value)
        cmd += ["--set", f"{key}={text}"]
    return cmd


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a training subprocess: no inherited process-group variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "MMKIT_LAUNCHED", "MMKIT_FAULT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["COLUMNS"] = "400"  # rich would wrap long messages (paths) at 80 columns
    env.update(extra or {})
    return env


def run(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout the whole group is killed (a hang then
    fails instead of blocking) and ``TimeoutError`` is raised with the output so far."""
    proc = subprocess.Popen(cmd, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise TimeoutError(f"{' '.join(cmd[3:])} ran past {timeout:g}s (killed):\n{out[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def last_logged_step(output_dir: Path) -> int:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    step = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            step = max(step, int(record["step"]))
    return step


def kill_at_step(cmd: list[str], output_dir: Path, step: int, *, delay_s: float = 0.0, timeout: float = 300,
                 env: dict[str, str] | None = None) -> int:
    """Start ``cmd``, wait until ``metrics.jsonl`` shows ``step`` (plus ``delay_s``), then SIGKILL
    its process group; returns the last step logged before the kill (or the exit status's negation
    if the run ended first)."""
    proc = subprocess.Popen(cmd, env=env or child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if last_logged_step(output_dir) >= step:
                if delay_s:
                    time.sleep(delay_s)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return last_logged_step(output_dir)
            if time.monotonic() > deadline:
                raise TimeoutError(f"step {step} not reached in {timeout:g}s")
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return -(proc.returncode or 0)


def load_trainable(directory: Path) -> dict[str, Any]:
    """A run's (``OUTPUT/model``) or a checkpoint's (``step-N/model``) trainable weights."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if (directory / "model").is_dir():
        directory = directory / "model"
    return load_file(str(directory / "trainable.safetensors"))


def max_weight_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between two runs' trainable weights (their names must match)."""
    wa, wb = load_trainable(a), load_trainable(b)
    if set(wa) != set(wb):
        raise ValueError(f"different trainable weights: {sorted(set(wa) ^ set(wb))[:5]}")
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def logged_losses(output_dir: Path) -> dict[int, float]:
    out = {}
    for line in (Path(output_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[int(record["step"])] = float(record["loss"])
    return out

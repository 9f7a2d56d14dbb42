"""Real shapes on CPU: a ~0.5B LLM (Qwen2-0.5B's configuration) with CLIP ViT-B/16, random init,
saved locally in bf16 and loaded back through the ordinary ``from_pretrained`` path, trained for a
few steps in 2 processes under ZeRO-3 and bf16 (``mmkit train --num-procs 2``).

    python benchmarks/real_shape.py [--steps 3] [--workdir DIR] [--json]

Reports each training process's peak resident memory (VmHWM, read from /proc while it runs),
once the model is loaded and the engine built and at the end of training, against the full fp32
model size (all parameters x 4 bytes), the libraries' own footprint, and the dry run's
model-state estimate for ZeRO-3 on 2 processes; the tokens/s the run logged, and its losses.
Under ZeRO-3 the LLM is created partitioned (``zero.Init``); transformers' ZeRO-3 loader has rank 0
read the whole checkpoint (bf16 here) and hand each layer to the partitions, so rank 0 peaks
higher while loading. ``--max-live`` bounds the parameters ZeRO-3 keeps gathered (DeepSpeed's
default, 1e9, would keep this whole model gathered in every process). Needs the ``image``
plugin, ~8 GB of free memory and several minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Qwen/Qwen2-0.5B config.json (architecture fields)
QWEN2_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "hidden_act": "silu",
    "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 24,
    "attention_dropout": 0.0, "initializer_range": 0.02, "bos_token_id": 151643, "eos_token_id": 151643,
}
# openai/clip-vit-base-patch16 vision_config
CLIP_B16 = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
            "image_size": 224, "patch_size": 16, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05}
WORDS = ("red", "green", "blue", "cube", "ball", "cone")


def write_models(root: Path) -> dict[str, str]:
    """Random-init Qwen2-0.5B (bf16 safetensors + a small tokenizer) and CLIP ViT-B/16 (+ its image
    processor), each saved with ``save_pretrained``."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

    from mmkit.demo.llm import build_tokenizer

    llm, clip = root / "qwen2-0.5b-random", root / "clip-vit-b16-random"
    if not (llm / "config.json").is_file():
        torch.manual_seed(0)
        config = Qwen2Config(**{k: v for k, v in QWEN2_05B.items() if k != "architectures"})
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)  # published Qwen2 weights are bf16
        model.save_pretrained(llm, max_shard_size="500MB")
        del model
        tokenizer = build_tokenizer(["What is shown in the image ? " + " ".join(WORDS)])
        tokenizer.save_pretrained(llm)
    if not (clip / "config.json").is_file():
        torch.manual_seed(1)
        CLIPVisionModel(CLIPVisionConfig(**CLIP_B16)).save_pretrained(clip)
        CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(clip)
    return {"llm": str(llm), "clip": str(clip)}


def write_data(root: Path, samples: int = 8) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(samples):
        path = root / "images" / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)).save(path)
        records.append({"id": str(i), "image": str(path), "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown in the image ?"},
            {"from": "gpt", "value": " ".join(WORDS[j % 6] for j in range(i, i + 8))}]})
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(data)


def _mmkit(*args: str) -> list[str]:
    return [sys.executable, "-c", "from mmkit_cli.main import main; main()", *args]


def _options(models: dict[str, str], data: str, out: Path, steps: int) -> list[str]:
    return ["--llm", models["llm"], "--data", data, "--modalities", "image", "--encoder-pretrained",
            f"image={models['clip']}", "--precision", "bf16", "--zero-stage", "3", "--num-procs", "2",
            "--max-steps", str(steps), "--micro-batch-size", "1", "--global-batch-size", "2",
            "--output-dir", str(out), "--resume", "never", "--set", "log_every=1", "--set", "tensorboard=false",
            "--set", "max_length=512", "--set", "warmup_ratio=0"]


class PeakMemory:
    """Peak RSS (VmHWM) of every training worker below a process, polled from /proc."""

    def __init__(self, root_pid: int, interval: float = 0.2):
        self.root, self.interval = root_pid, interval
        self.peaks: dict[int, int] = {}  # pid -> bytes
        self.ranks: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                # the workers are the launcher's own children (their forks keep the command line)
                children = psutil.Process(self.root).children(recursive=False)
            except psutil.Error:
                children = []
            for child in children:
                try:
                    if "mmkit.training.launch" not in " ".join(child.cmdline()):
                        continue
                    status = Path(f"/proc/{child.pid}/status").read_text()
                    hwm = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
                    self.peaks[child.pid] = max(self.peaks.get(child.pid, 0), hwm)
                    if child.pid not in self.ranks:
                        self.ranks[child.pid] = child.environ().get("RANK", "?")
                except (psutil.Error, OSError, AttributeError):
                    continue
            time.sleep(self.interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="keep models and runs here (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=131072,
                        help="glibc MALLOC_MMAP_THRESHOLD_ for the workers (0: glibc's default, which raises the "
                             "threshold as blocks are freed and keeps ZeRO-3's freed gather buffers resident)")
    parser.add_argument("--max-live", type=int, default=100_000_000,
                        help="zero3_max_live_parameters (DeepSpeed's default 1e9 keeps this whole model gathered)")
    args = parser.parse_args(argv)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="mmkit_real_shape_"))
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "COLUMNS": "200"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MMKIT_LAUNCHED"):
        env.pop(key, None)
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)

    t0 = time.monotonic()
    models = write_models(root)
    data = write_data(root)
    prepare_s = time.monotonic() - t0
    out = root / "run"
    options = _options(models, data, out, args.steps) + [
        "--gradient-checkpointing", "--set", f"zero3_max_live_parameters={args.max_live}"]
    dry = subprocess.run(_mmkit("train", *options, "--dry-run", "--json"), capture_output=True, text=True, env=env)
    if dry.returncode != 0:
        print(dry.stdout, dry.stderr, file=sys.stderr)
        return 1
    estimate = json.loads(dry.stdout)
    params = estimate["parameters_all"]["total"]

    # what a worker holds before any model: the libraries (torch, transformers, deepspeed, peft, plugins)
    probe = ("import torch, deepspeed, transformers, peft; from mmkit.training import recipe; "
             "from mmkit.plugins import get_host; get_host(); import re; "
             "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    baseline = int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
                   .stdout.split()[-1]) * 1024

    t0 = time.monotonic()
    proc = subprocess.Popen(_mmkit("train", *options), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines, loaded = [], {}
    with PeakMemory(proc.pid) as memory:
        for line in proc.stdout:  # the banner is printed once the engine is built: the loading phase is over
            lines.append(line)
            if "mmkit train stage=" in line and not loaded:
                time.sleep(2 * memory.interval)
                loaded = dict(memory.peaks)
        proc.wait()
    output = "".join(lines)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        print(output[-6000:], file=sys.stderr)
        return proc.returncode
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    rate = re.search(r"([\d.]+) tokens/s", output)
    gib = 2**30
    result = {
        "llm_config": "Qwen2-0.5B (random init, bf16 safetensors)", "encoder_config": "CLIP ViT-B/16 (random init)",
        "parameters": estimate["parameters"], "parameters_total": params,
        "full_fp32_model_gib": round(params * 4 / gib, 3),
        "dry_run_zero3_model_states_gib_per_process": estimate["memory_per_gpu_gib"]["3"],
        "peak_rss_gib_per_process_loading": {f"rank{memory.ranks.get(pid, '?')}": round(b / gib, 3)
                                             for pid, b in sorted(loaded.items(), key=lambda kv: memory.ranks.get(kv[0], ""))},
        "peak_rss_gib_per_process": {f"rank{memory.ranks.get(pid, '?')}": round(b / gib, 3)
                                     for pid, b in sorted(memory.peaks.items(), key=lambda kv: memory.ranks.get(kv[0], ""))},
        "library_baseline_rss_gib": round(baseline / gib, 3),
        "below_full_fp32": bool(memory.peaks) and max(memory.peaks.values()) < params * 4,
        "loading_below_full_fp32": bool(loaded) and max(loaded.values()) < params * 4,
        "zero3_max_live_parameters": args.max_live, "malloc_mmap_threshold": args.malloc_mmap_threshold or "glibc default", "gradient_checkpointing": True,
        "tokens_per_s": float(rate.group(1)) if rate else None,
        "losses": [round(r["loss"], 4) for r in losses],
        "steps": args.steps, "train_wall_s": round(wall, 1), "prepare_s": round(prepare_s, 1),
        "tokens_per_sample": estimate["tokens_per_sample"],
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0 if result["below_full_fp32"] else 1


if __name__ == "__main__":
    sys.exit(main())

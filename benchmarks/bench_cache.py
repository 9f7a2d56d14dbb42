"""Training throughput with online encoding against cached encoder features, measured in one run.

    python benchmarks/bench_cache.py [--epochs 1] [--preset demo|pointcloud-large]

Presets (both on the embedded demo's data and its tiny LLaMA LLM, batch 32, one torch thread, CPU):

- ``demo``: the demo's own frozen encoders (CLIP 2 x 128 on 16 px digits, PointNet++ 256 points ->
  16 tokens). The encoders are most of a step's time next to the 64-wide LLM.
- ``pointcloud-large``: the point-cloud modality alone with a larger PointNet++ (1024 points,
  centres 256 -> 64, widths 128/256, 64 tokens x 256): an encoder far heavier than the LLM.

For each preset: one epoch with online encoding, then a run with ``cache_features`` into a fresh
directory (the cache is filled before training; the fill time is reported apart), then a later run
reading the filled cache. Throughput is the training loop's tokens/s (fill and evaluation
excluded). Reported, not asserted.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from mmkit.training import recipe
from mmkit.training.config import resolve_config

PRESETS = {
    "demo": {"modalities": ["image", "pointcloud"]},
    "pointcloud-large": {
        "modalities": ["pointcloud"],
        "encoder_options": {"pointcloud": {"num_points": 1024, "centres": [256, 64], "neighbours": [16, 16],
                                           "widths": [128, 256], "output_dim": 256}},
    },
}


def run(options: dict, out: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    summary = recipe.train(resolve_config(None, {**options, "output_dir": str(out)}))
    return summary, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", choices=sorted(PRESETS), action="append")
    parser.add_argument("--epochs", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.preset or ["demo", "pointcloud-large"]:
        root = Path(tempfile.mkdtemp(prefix=f"mmkit_bench_cache_{name}_"))
        base = {**PRESETS[name], "epochs": args.epochs, "micro_batch_size": 32, "tensorboard": False,
                "log_every": 1000, "num_threads": 1}
        online, online_wall = run({**base, "cache_features": None}, root / "online")  # the demo defaults cache
        cached_first, first_wall = run({**base, "cache_features": str(root / "cache")}, root / "cached1")
        cached_later, later_wall = run({**base, "cache_features": str(root / "cache")}, root / "cached2")
        fill = first_wall - later_wall  # the same run but for the fill
        print(f"\npreset {name}: {online['steps']} steps of batch 32 per run")
        print(f"  online encoding          {online['tokens_per_s']:9,.0f} tokens/s  "
              f"(loop {online['train_seconds']:.1f} s)")
        print(f"  cached, filling run      {cached_first['tokens_per_s']:9,.0f} tokens/s  (loop "
              f"{cached_first['train_seconds']:.1f} s; filling the cache took about {fill:.1f} s)")
        print(f"  cached, a later run      {cached_later['tokens_per_s']:9,.0f} tokens/s  (loop "
              f"{cached_later['train_seconds']:.1f} s)")
        print(f"  speed-up of a cached epoch: {cached_later['tokens_per_s'] / online['tokens_per_s']:.2f}x; "
              f"final loss online {online['final_loss']:.4f}, cached {cached_later['final_loss']:.4f}")
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

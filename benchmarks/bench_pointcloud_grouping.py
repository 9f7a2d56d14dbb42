"""What moving the point-cloud encoder's sampling and grouping into ``preprocess`` buys per step.

The demo's PointNet++ encoder on the demo's solids, one thread: forward on bare points (FPS and kNN
in every forward, as before the move and as a stock PointNet++) against forward on preprocessed
items (a GroupedCloud batch: the points with their int64 grouping), and the preprocessing each costs a loader worker per cloud.
Rounds interleave the two; CPU time of this thread (``time.thread_time``) rather than wall time, so
other processes on a shared machine do not blur a few-millisecond difference. The features are
bitwise equal (``plugins/pointcloud/tests/test_grouping.py``).

    python benchmarks/bench_pointcloud_grouping.py [--clouds 10 32] [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch


def cpu_ms(fn: Callable[[], object], repeats: int) -> float:
    start = time.thread_time()
    for _ in range(repeats):
        fn()
    return (time.thread_time() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clouds", type=int, nargs="+", default=[10, 32], help="clouds per step (demo: ~10 of 32)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--points", type=int, default=2048, help="points per raw cloud")
    args = parser.parse_args()

    from mmkit_plugin_pointcloud.config import DEMO, TINY
    from mmkit_plugin_pointcloud.encoder import build_encoder
    from mmkit_plugin_pointcloud.shapes import sample_shape

    torch.set_num_threads(1)
    enc = build_encoder(**{**TINY, **DEMO}).eval()
    rng = np.random.default_rng(0)
    names = ("sphere", "cube", "cylinder", "cone", "torus")
    m = statistics.median
    for count in args.clouds:
        raws = [sample_shape(names[i % len(names)], rng, args.points).astype(np.float32) for i in range(count)]
        items = enc.collate([enc.preprocess(c) for c in raws])
        points = enc.stock_input(items).contiguous()
        grouped, stored, before, after = [], [], [], []
        with torch.no_grad():
            assert torch.equal(enc(points), enc(items))
            for _ in range(args.rounds):
                grouped.append(cpu_ms(lambda: enc(points), 10))
                stored.append(cpu_ms(lambda: enc(items), 10))
                before.append(cpu_ms(lambda: enc.prepare_points(raws[0]), 5))
                after.append(cpu_ms(lambda: enc.preprocess(raws[0]), 5))
        print(f"{count} clouds per step, CPU ms, median [min-max] of {args.rounds} interleaved rounds:\n"
              f"  encoder forward, grouping every step: {m(grouped):.2f} [{min(grouped):.2f}-{max(grouped):.2f}]\n"
              f"  encoder forward, grouping preprocessed: {m(stored):.2f} [{min(stored):.2f}-{max(stored):.2f}]"
              f"  (saves {m(grouped) - m(stored):.2f} ms a step, {m(grouped) / m(stored):.2f}x)\n"
              f"  preprocess one {args.points}-point cloud (loader worker): {m(before):.2f} -> {m(after):.2f}")


if __name__ == "__main__":
    main()

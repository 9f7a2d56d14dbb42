"""Where a default demo training step's time goes, op by op (torch.profiler), plus the pieces the
profile points at: the point-cloud encoder's weight-free sampling (FPS + kNN) and DeepSpeed's
optimizer step against torch's own.

    python benchmarks/profile_step.py [--steps 6] [--threads 1]

It drives mmkit's real loop through ``mmkit.bench.step`` (the rig ``mmkit bench`` measures); the
phase shares it prints are the same figures as ``mmkit bench``'s "where a step's time goes".
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    from mmkit.bench import step as st

    with tempfile.TemporaryDirectory(prefix="mmkit-profile-") as tmp:
        rig = st.build_rig("demo", Path(tmp), max_samples=512)
        st.add_variant(rig, "padded")
        st.run_variant(rig, "padded", args.warmup)
        rec = rig.variants["padded"].rec
        rec.steps.clear()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            st.run_variant(rig, "padded", args.steps + 1)
        shares = st.phase_shares(rec, args.steps + 1)
        step_ms = 1e3 * sum(s["seconds"] for s in rec.steps[1:]) / max(len(rec.steps) - 1, 1)
        print(f"default demo step (profiled, so slower than unprofiled): {step_ms:.1f} ms")
        print("  " + "  ".join(f"{k} {100 * v:.1f}%" for k, v in shares.items()))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))

        if "pointcloud" in rig.modalities:
            sampling_share(rig)
        optimizer_compare(rig)


def sampling_share(rig) -> None:
    """The weight-free part of the point-cloud encoder: FPS + kNN on a micro-batch of clouds."""
    from mmkit_plugin_pointcloud.sampling import farthest_point_sample, gather_points, knn

    enc = rig.assembled.model.encoders["pointcloud"]
    cfg = getattr(enc, "cfg", None) or enc.config  # PointNet2Config
    x = torch.randn(rig.cfg.micro_batch_size, cfg.num_points, cfg.in_channels)  # bare points: grouped in forward

    def sampling() -> None:
        pos = x[..., :3]
        order = farthest_point_sample(pos, cfg.centres[0])
        points = pos
        for level, (m, k) in enumerate(zip(cfg.centres, cfg.neighbours)):
            idx = order[:, :m] if level == 0 else torch.arange(m).expand(x.shape[0], m)
            centres = gather_points(points, idx)
            knn(centres, points, k)
            points = centres

    def full() -> None:
        with torch.no_grad():
            enc(x)

    for name, fn in (("FPS + kNN only", sampling), ("whole encoder forward", full)):
        fn()
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < 1.0:
            fn()
            n += 1
        print(f"pointcloud encoder, batch {x.shape[0]}: {name}: {1e3 * (time.perf_counter() - start) / n:.1f} ms")


def optimizer_compare(rig) -> None:
    """DeepSpeed's engine.step (ZeRO-0, one process) vs a plain torch AdamW step + clip_grad_norm_."""
    params = [p for g in rig.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.randn_like(p)
    plain = torch.optim.AdamW([{"params": g["params"], "lr": g["lr"]} for g in rig.param_groups])

    def plain_step() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        plain.step()

    for name, fn in (("torch AdamW (foreach) + clip_grad_norm_", plain_step),):
        fn()
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < 1.0:
            fn()
            n += 1
        print(f"optimizer: {name}: {1e3 * (time.perf_counter() - start) / n:.2f} ms "
              f"({sum(p.numel() for p in params):,} trainable parameters)")


if __name__ == "__main__":
    main()

"""mmkit hook implementations: the ``pointcloud`` modality and its ``pointnet2`` encoder.

Only cheap imports here (no torch, no torch_geometric): everything heavy is a lazy string reference.
"""

from __future__ import annotations

from mmkit import DemoSpec, EncoderSpec, MarkerSpec, ModalitySpec, hookimpl
from mmkit_plugin_pointcloud.config import DEMO, REAL, TINY

# Literal rather than imported from io.py, which would pull in numpy at plugin-listing time.
FILE_TYPES = (".npy", ".ply", ".pcd", ".xyz", ".txt")


@hookimpl
def mmkit_modalities() -> list[ModalitySpec]:
    return [ModalitySpec(
        name="pointcloud",
        data_keys=("pointcloud", "pcl"),  # "pcl" is LAMM's key
        markers=MarkerSpec("<pointcloud>", begin="<Pcl>", end="</Pcl>", aliases=("<pcl>",)),
        load="mmkit_plugin_pointcloud.io:load_point_cloud",
        encoder="pointnet2",
        projector="mlp",
        file_types=FILE_TYPES,
        demo=DemoSpec(
            build="mmkit_plugin_pointcloud.demo:build_demo",
            encoder_options=DEMO,
            description="classify procedurally generated solids (sphere, cube, cylinder, cone, torus) "
                        "seen from random rotations; 1500 train / 150 test",
        ),
        description="3-D point clouds (.npy N x 3 / N x 6 as LAMM, .ply, .pcd, .xyz, .txt)",
    )]


@hookimpl
def mmkit_encoders() -> list[EncoderSpec]:
    return [EncoderSpec(
        name="pointnet2",
        modality="pointcloud",
        build="mmkit_plugin_pointcloud.encoder:build_encoder",
        tiny=TINY,
        # Realistic sizes for `mmkit bench --preset real`: PointNet++ SSG at 1,024 points, LAMM/EPCL scale at 8,192.
        presets={"pointnet2_1k": {"num_points": 1024, "in_channels": 6, "centres": [512, 128], "neighbours": [32, 64],
                                  "widths": [128, 256], "output_dim": 512},
                 "pointnet2_8k": REAL},
        description="PointNet++ set abstraction (torch-geometric PointNetConv, FPS + kNN in plain torch): "
                    "num_points -> centres[-1] tokens; options num_points, in_channels, centres, neighbours, "
                    "widths, output_dim, transformer_layers, num_heads, seed",
    )]


@hookimpl
def mmkit_benchmarks():
    # Recipes (YAML in this package's benchmarks/); "demo" runs on a demo run's output directory.
    from mmkit.specs import BenchmarkSpec

    return [BenchmarkSpec(name="shapes", recipe="mmkit_plugin_pointcloud:benchmarks/shapes.yaml", suites=("demo",),
                          description="the demo's held-out shapes, as mmkit train scores them")] + [
        # LAMM-Bench 3-D on its published meta files: --data-root LAMM's 3D_Benchmark folder
        BenchmarkSpec(name=name, recipe=f"mmkit_plugin_pointcloud:benchmarks/{name}.yaml", suites=("lamm", "lamm3d"))
        for name in ("lamm_scannet_det", "lamm_scanrefer", "lamm_scanqa")]

"""mmkit's ``image`` modality: registration only.

Everything heavy (Pillow decoding, torch, transformers) is named by ``"module:attribute"`` strings
and imported when first used, so discovering this plugin costs almost nothing.
"""

from __future__ import annotations

from mmkit import DemoSpec, EncoderSpec, ExporterSpec, MarkerSpec, ModalitySpec, hookimpl

#: Random-init CLIP for CPU tests: 16 px, 4 px patches -> 16 patch tokens of width 32.
TINY_CLIP = {
    "image_size": 16,
    "patch_size": 4,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}

#: The demo's frozen random-init CLIP: 8x8 digits upscaled to 16 px, 16 patch tokens of width 128,
#: last layer. A linear probe on these features reads the held-out digits at about 0.98 (0.93 even
#: mean-pooled); ``tests/test_demo.py`` keeps that true.
DEMO_CLIP = {
    "image_size": 16,
    "patch_size": 4,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "feature_layer": -1,
    "drop_cls": True,
    "seed": 0,
}

IMAGE_FILE_TYPES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

#: The video demo's frozen random-init CLIP: 16 px frames, one 16 px patch -> 1 token of width 128 per
#: frame, up to 8 frames (3..8 in the demo) -> 5..15 tokens a clip with the separators between frames.
#: One token a frame is what the tiny demo LLM learns from fastest: held-out 1.00 in 324 steps (4
#: tokens a frame, 8 px patches: 0.70 in the same steps; chance 0.25).
DEMO_VIDEO = {
    "image_size": 16,
    "patch_size": 16,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "feature_layer": -1,
    "drop_cls": True,
    "seed": 0,
    "max_frames": 8,
}
#: Literal rather than imported from video_io.py, which would pull in Pillow at plugin-listing time;
#: a folder of numbered frames is a video too.
VIDEO_FILE_TYPES = (".gif", ".apng", ".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ogv",
                    ".wmv", ".flv")

#: CLIP attention projections (CLIPAttention), the usual encoder-LoRA targets of images and video alike.
CLIP_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@hookimpl
def mmkit_modalities() -> list[ModalitySpec]:
    return [
        ModalitySpec(
            name="image",
            data_keys=("image",),
            markers=MarkerSpec("<image>", begin="<Img>", end="</Img>"),
            load="mmkit_plugin_image.io:load_image",
            encoder="clip",
            projector="mlp",
            file_types=IMAGE_FILE_TYPES,
            encoder_lora_targets=CLIP_LORA_TARGETS,
            demo=DemoSpec(
                build="mmkit_plugin_image.demo:build_demo",
                encoder_options=DEMO_CLIP,
                description="UCI handwritten digits (8x8, 1797 images, CC BY 4.0): 'What digit is shown?'",
            ),
            description="RGB images (any Pillow-readable file), encoded by a CLIP vision transformer",
        ),
        ModalitySpec(
            name="video",
            data_keys=("video",),
            markers=MarkerSpec("<video>", begin="<Vid>", end="</Vid>"),
            load="mmkit_plugin_image.video_io:load_video",
            encoder="clip_video",
            projector="mlp",
            file_types=VIDEO_FILE_TYPES,
            encoder_lora_targets=CLIP_LORA_TARGETS,  # the same CLIP tower, frame by frame
            demo=DemoSpec(
                build="mmkit_plugin_image.video_demo:build_demo",
                encoder_options=DEMO_VIDEO,
                description="generated clips of 3-8 frames of a moving square: 'Which way does it move?'",
            ),
            description="video clips (a folder of numbered frames, an animated GIF, or with PyAV any FFmpeg "
                        "video), up to max_frames frames sampled uniformly, each encoded by the CLIP tower",
        ),
    ]


@hookimpl
def mmkit_encoders() -> list[EncoderSpec]:
    return [
        EncoderSpec(
            name="clip",
            modality="image",
            build="mmkit_plugin_image.encoder:build_encoder",
            tiny=TINY_CLIP,
            # Realistic sizes for `mmkit bench --preset real` (random init, LLaVA's penultimate layer).
            presets={"clip_vit_b16": {"image_size": 224, "patch_size": 16, "hidden_size": 768,
                                      "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
                     "clip_vit_l14_336": {"image_size": 336, "patch_size": 14, "hidden_size": 1024,
                                          "intermediate_size": 4096, "num_hidden_layers": 24,
                                          "num_attention_heads": 16}},
            description="CLIP vision tower (patch tokens); options pretrained (hub id or path), "
                        "feature_layer (LLaVA -2, LAMM -1), drop_cls, and for random init the "
                        "CLIPVisionConfig sizes, seed, resample",
        ),
        EncoderSpec(
            name="clip_video",
            modality="video",
            build="mmkit_plugin_image.video_encoder:build_video_encoder",
            tiny={**TINY_CLIP, "max_frames": 4},
            description="the clip encoder on each of up to max_frames uniformly sampled frames, with a "
                        "separator row between frames; options max_frames, temporal_pool, spatial_pool, "
                        "separators, and every clip option",
        ),
    ]


@hookimpl
def mmkit_benchmarks():
    # Recipes (YAML in this package's benchmarks/); "demo" runs on a demo run's output directory.
    from mmkit.specs import BenchmarkSpec

    return [
        BenchmarkSpec(name="digits", recipe="mmkit_plugin_image:benchmarks/digits.yaml", suites=("demo",),
                      description="the demo's held-out digits, as mmkit train scores them"),
        BenchmarkSpec(name="digits_choice", recipe="mmkit_plugin_image:benchmarks/digits_choice.yaml",
                      suites=("demo",), description="the held-out digits answered by likelihood over 0-9"),
        BenchmarkSpec(name="count_squares", recipe="mmkit_plugin_image:benchmarks/count_squares.yaml",
                      suites=("demo",), description="counting squares in generated images (LAMM counting)"),
        BenchmarkSpec(name="locate_square", recipe="mmkit_plugin_image:benchmarks/locate_square.yaml",
                      suites=("demo",), description="locating a square in generated images (LAMM Binary-Loc)"),
    ] + [  # LAMM-Bench 2-D on its published meta files: --data-root LAMM's 2D_Benchmark folder
        BenchmarkSpec(name=name, recipe=f"mmkit_plugin_image:benchmarks/{name}.yaml", suites=("lamm", "lamm2d"))
        for name in ("lamm_cifar10", "lamm_ucmerced", "lamm_voc2012", "lamm_locating_voc2012", "lamm_fsc147",
                     "lamm_flickr30k", "lamm_svt", "lamm_sqaimage", "lamm_sqaimage_ppl", "lamm_ai2d")
    ]


@hookimpl
def mmkit_exporters() -> list[ExporterSpec]:
    return [
        ExporterSpec(
            name="llava-hf",
            export="mmkit_plugin_image.export_llava:export_llava",
            check="mmkit_plugin_image.export_llava:why_not",
            description="Hugging Face LLaVA (LlavaForConditionalGeneration + AutoProcessor): CLIP + mlp/linear "
                        "projector runs, LoRA merged, markers in the vocabulary",
        )
    ]

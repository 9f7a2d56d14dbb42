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
            # CLIP attention projections (CLIPAttention), the usual encoder-LoRA targets.
            encoder_lora_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
            demo=DemoSpec(
                build="mmkit_plugin_image.demo:build_demo",
                encoder_options=DEMO_CLIP,
                description="UCI handwritten digits (8x8, 1797 images, CC BY 4.0): 'What digit is shown?'",
            ),
            description="RGB images (any Pillow-readable file), encoded by a CLIP vision transformer",
        )
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
        )
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

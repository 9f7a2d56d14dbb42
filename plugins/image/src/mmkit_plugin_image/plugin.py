"""mmkit's ``image`` modality: registration only.

Everything heavy (Pillow decoding, torch, transformers) is named by ``"module:attribute"`` strings
and imported when first used, so discovering this plugin costs almost nothing.
"""

from __future__ import annotations

from mmkit import DemoSpec, EncoderSpec, MarkerSpec, ModalitySpec, hookimpl

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
            description="CLIP vision tower (patch tokens); options pretrained (hub id or path), "
                        "feature_layer (LLaVA -2, LAMM -1), drop_cls, and for random init the "
                        "CLIPVisionConfig sizes, seed, resample",
        )
    ]

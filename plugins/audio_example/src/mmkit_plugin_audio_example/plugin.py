"""The plugin module named by the ``mmkit`` entry point in pyproject.toml.

mmkit imports this module for every command, even ``mmkit --help``, so it must stay cheap: it
imports ``mmkit`` (no torch) and names everything heavy by a lazy ``"module:attribute"`` string.
Nothing here imports torch, transformers or numpy; the contract suite checks that.
"""

from __future__ import annotations

from mmkit import DemoSpec, EncoderSpec, MarkerSpec, ModalitySpec, hookimpl

#: Options of the frozen random-init encoder the demo trains on (no download). ``init_std`` is
#: raised from Whisper's 0.02, which is meant for training from scratch: with frozen weights that
#: small the front-end convolutions pass on little besides the positional embedding.
DEMO_ENCODER_OPTIONS = {"d_model": 64, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 128,
                        "num_mel_bins": 24, "chunk_length": 1, "num_tokens": 16, "init_std": 0.2}


@hookimpl
def mmkit_modalities() -> list[ModalitySpec]:
    return [
        ModalitySpec(
            name="audio_example",
            data_keys=("audio",),
            markers=MarkerSpec("<audio>", begin="<Aud>", end="</Aud>"),
            load="mmkit_plugin_audio_example.io:load_wav",
            encoder="whisper_encoder",
            projector="mlp",
            file_types=(".wav",),
            # Attention projections of the Whisper encoder layers, adapted when encoder LoRA is on.
            encoder_lora_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
            demo=DemoSpec(
                build="mmkit_plugin_audio_example.demo:build_demo",
                encoder_options=DEMO_ENCODER_OPTIONS,
                description="sine / square / sawtooth / noise clips, 0.5 s at 16 kHz",
            ),
            description="WAV audio (PCM 8-32 bit or float, any rate, mono or stereo) through a Whisper encoder",
        )
    ]


@hookimpl
def mmkit_encoders() -> list[EncoderSpec]:
    return [
        EncoderSpec(
            name="whisper_encoder",
            modality="audio_example",
            build="mmkit_plugin_audio_example.encoder:build_encoder",
            # Small enough for a CPU test: 1 s window, 16 mel bins, one 32-wide layer.
            tiny={"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
                  "num_mel_bins": 16, "chunk_length": 1, "num_tokens": 8},
            # Whisper-base's encoder shape (30 s window, 80 mel bins) for `mmkit bench --preset real`.
            presets={"whisper_base": {"d_model": 512, "encoder_layers": 6, "encoder_attention_heads": 8,
                                      "encoder_ffn_dim": 2048, "num_mel_bins": 80, "chunk_length": 30,
                                      "num_tokens": 32}},
            description="Whisper's audio encoder (pretrained: a hub id such as openai/whisper-tiny or a "
                        "local folder), average-pooled to num_tokens tokens",
        )
    ]

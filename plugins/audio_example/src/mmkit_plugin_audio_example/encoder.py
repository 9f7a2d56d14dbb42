"""The ``whisper_encoder`` encoder: Whisper's audio encoder, pooled to a fixed number of tokens.

Only ``plugin.py`` names this module, as the string ``"mmkit_plugin_audio_example.encoder:build_encoder"``;
mmkit imports it (and with it torch and transformers) the first time an encoder is built.

Pipeline: waveform --(linear resampling)--> 16 kHz --(WhisperFeatureExtractor)--> log-mel
``[n_mels, frames]``, padded or cut to the extractor's ``chunk_length`` --(Whisper encoder)-->
``[frames / 2, d_model]`` --(adaptive average pooling over time)--> ``[num_tokens, d_model]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from mmkit import ModalityEncoder, seeded, weights_sha256
from torch import nn
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperPreTrainedModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from mmkit_plugin_audio_example.io import Audio

#: Defaults of the random-init options: the shape and front-end of openai/whisper-tiny's encoder,
#: with Whisper's own init scale. The ``tiny`` and demo options in plugin.py shrink it.
RANDOM_INIT: dict[str, Any] = {"seed": 0, "d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6,
                               "encoder_ffn_dim": 1536, "num_mel_bins": 80, "chunk_length": 30,
                               "sampling_rate": 16000, "hop_length": 160, "n_fft": 400, "init_std": 0.02}


class WhisperEncoderOnly(WhisperPreTrainedModel):
    """Just the encoder of a Whisper checkpoint.

    Its weights are named ``encoder.*``. transformers strips the ``model.`` prefix of a full
    Whisper checkpoint (``model.encoder.*``), so ``from_pretrained("openai/whisper-tiny")`` loads
    the encoder and skips the decoder instead of materialising it (the ``WhisperForAudioClassification``
    trick, without its classifier head).
    """

    _keys_to_ignore_on_load_unexpected = [r"decoder\.", r"proj_out\."]

    def __init__(self, config: WhisperConfig):
        super().__init__(config)
        self.encoder = WhisperEncoder(config)
        self.post_init()

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_features=input_features).last_hidden_state


class WhisperAudioEncoder(ModalityEncoder):
    """A frozen Whisper encoder as an mmkit :class:`~mmkit.ModalityEncoder`."""

    def __init__(self, model: WhisperEncoderOnly, feature_extractor: WhisperFeatureExtractor, *,
                 num_tokens: int, source: dict[str, Any]):
        super().__init__()
        config = model.config
        frames = 2 * config.max_source_positions  # conv2 has stride 2
        if feature_extractor.feature_size != config.num_mel_bins or feature_extractor.nb_max_frames != frames:
            raise ValueError(
                f"feature extractor gives {feature_extractor.feature_size} mel bins x "
                f"{feature_extractor.nb_max_frames} frames; the encoder expects {config.num_mel_bins} x {frames}")
        if not 1 <= num_tokens <= config.max_source_positions:
            raise ValueError(f"num_tokens={num_tokens}: must be between 1 and {config.max_source_positions} "
                             "(the encoder's output frames)")
        # Dither adds random noise to the spectrogram: features must be deterministic, since the
        # feature cache and checkpoints key on identity().
        feature_extractor.dither = 0.0
        self.model = model
        self.feature_extractor = feature_extractor
        self.source = source
        self.num_tokens = num_tokens
        self.output_dim = config.d_model
        self.input_shape = (config.num_mel_bins, frames)

    @property
    def sampling_rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)

    def preprocess(self, raw: Audio | tuple[np.ndarray, int]) -> torch.Tensor:
        """One clip -> log-mel ``[n_mels, frames]``; shorter clips are padded with silence, longer
        ones cut to the extractor's ``chunk_length`` seconds (Whisper's fixed 30 s window)."""
        waveform, rate = (raw.waveform, raw.sample_rate) if isinstance(raw, Audio) else raw
        waveform = resample(np.asarray(waveform, dtype=np.float32), int(rate), self.sampling_rate)
        feats = self.feature_extractor(waveform, sampling_rate=self.sampling_rate, return_tensors="np")
        return torch.from_numpy(np.asarray(feats["input_features"][0], dtype=np.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.model(x.to(self.model.dtype))  # [B, frames / 2, d_model]
        # Average pooling over time: a fixed token count whatever the window length; each output
        # token only sees its own clip, so the batch does not change the result.
        pooled = nn.functional.adaptive_avg_pool1d(hidden.transpose(1, 2), self.num_tokens)
        return pooled.transpose(1, 2)

    def identity(self) -> dict[str, Any]:
        cfg = self.model.config
        fe = self.feature_extractor
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            **self.source,
            "num_tokens": self.num_tokens,
            "whisper": {k: getattr(cfg, k) for k in ("d_model", "encoder_layers", "encoder_attention_heads",
                                                     "encoder_ffn_dim", "num_mel_bins", "max_source_positions",
                                                     "activation_function", "scale_embedding")},
            "features": {"sampling_rate": fe.sampling_rate, "n_fft": fe.n_fft, "hop_length": fe.hop_length,
                         "chunk_length": fe.chunk_length, "feature_size": fe.feature_size, "dither": fe.dither},
            "resampling": "linear",
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write weights (safetensors), Whisper config and feature-extractor config, in the layout
        ``build_encoder(pretrained=directory)`` reads back. ``num_tokens`` is a build option, not
        part of the checkpoint: pass it again when loading."""
        directory = Path(directory)
        self.model.save_pretrained(directory)  # config.json + model.safetensors, keys encoder.*
        self.feature_extractor.save_pretrained(directory)  # preprocessor_config.json
        return directory


def build_encoder(*, pretrained: str | None = None, num_tokens: int = 32, revision: str | None = None,
                  seed: int | None = None, d_model: int | None = None, encoder_layers: int | None = None,
                  encoder_attention_heads: int | None = None, encoder_ffn_dim: int | None = None,
                  num_mel_bins: int | None = None, chunk_length: int | None = None,
                  sampling_rate: int | None = None, hop_length: int | None = None, n_fft: int | None = None,
                  init_std: float | None = None) -> WhisperAudioEncoder:
    """Build the encoder (mmkit calls this through the ``EncoderSpec``).

    - ``pretrained``: a hub id (``openai/whisper-tiny``) or a local folder holding a Whisper
      checkpoint (full model or encoder only) and its ``preprocessor_config.json``. Weights are read
      from safetensors only; the decoder is skipped. ``revision`` pins a hub commit.
    - ``pretrained=None``: random init from the remaining options, each defaulting to
      :data:`RANDOM_INIT` (Whisper-tiny's shape). ``seed`` makes the weights a function of the
      options alone; ``chunk_length`` is the input window in whole seconds (Whisper's is 30).
    - ``num_tokens``: output tokens per clip (default 32).
    """
    given = {"seed": seed, "d_model": d_model, "encoder_layers": encoder_layers,
             "encoder_attention_heads": encoder_attention_heads, "encoder_ffn_dim": encoder_ffn_dim,
             "num_mel_bins": num_mel_bins, "chunk_length": chunk_length, "sampling_rate": sampling_rate,
             "hop_length": hop_length, "n_fft": n_fft, "init_std": init_std}
    if pretrained is not None:
        conflicting = sorted(k for k, v in given.items() if v is not None)
        if conflicting:  # a TypeError is reported by mmkit as "bad options"
            raise TypeError(f"options {conflicting} only apply to a random-init encoder, "
                            f"not with pretrained={pretrained!r}")
        model, extractor = _load_pretrained(pretrained, revision)
        # The weights' hash, not just the name: a local folder can be overwritten with new weights.
        source = {"pretrained": pretrained, "revision": revision, "weights_sha256": weights_sha256(model)}
        return WhisperAudioEncoder(model, extractor, num_tokens=num_tokens, source=source)
    opts: dict[str, Any] = {k: (RANDOM_INIT[k] if v is None else v) for k, v in given.items()}
    extractor = WhisperFeatureExtractor(feature_size=opts["num_mel_bins"], sampling_rate=opts["sampling_rate"],
                                        hop_length=opts["hop_length"], chunk_length=int(opts["chunk_length"]),
                                        n_fft=opts["n_fft"])
    config = WhisperConfig(d_model=opts["d_model"], encoder_layers=opts["encoder_layers"],
                           encoder_attention_heads=opts["encoder_attention_heads"],
                           encoder_ffn_dim=opts["encoder_ffn_dim"], num_mel_bins=opts["num_mel_bins"],
                           max_source_positions=extractor.nb_max_frames // 2, init_std=opts["init_std"],
                           decoder_layers=1)  # decoder fields are unused; keep them small
    with seeded(opts["seed"]):  # the random encoder is a function of the options (mmkit passes the run's seed)
        model = WhisperEncoderOnly(config)
    return WhisperAudioEncoder(model.eval(), extractor, num_tokens=num_tokens,
                               source={"pretrained": None, "seed": opts["seed"], "init_std": opts["init_std"]})


def _load_pretrained(source: str, revision: str | None) -> tuple[WhisperEncoderOnly, WhisperFeatureExtractor]:
    loaded: Any = WhisperEncoderOnly.from_pretrained(source, revision=revision or "main", use_safetensors=True,
                                                     output_loading_info=True)
    model, info = cast(tuple[WhisperEncoderOnly, dict[str, Any]], loaded)
    missing = sorted(info.get("missing_keys", ()))
    if missing:  # e.g. a checkpoint of another architecture: refuse rather than run random weights
        raise ValueError(f"{source}: no Whisper encoder weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    extractor = WhisperFeatureExtractor.from_pretrained(source, revision=revision or "main")
    # float32 whatever dtype the checkpoint was stored in (some Whisper repos hold fp16 weights).
    return model.float().eval(), extractor


def resample(waveform: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Linear-interpolation resampling. Crude (no anti-aliasing filter) but dependency-free and
    exact when the rates match; good enough to feed a 16 kHz model 44.1 kHz speech."""
    if rate == target or len(waveform) == 0:
        return waveform
    n_out = max(1, int(round(len(waveform) * target / rate)))
    t_out = np.arange(n_out, dtype=np.float64) * (rate / target)
    return np.interp(t_out, np.arange(len(waveform), dtype=np.float64), waveform).astype(np.float32)

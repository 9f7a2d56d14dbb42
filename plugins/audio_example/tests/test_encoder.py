"""The Whisper encoder: pretrained loading (offline, from tiny checkpoints in tmp_path), the
random-init path, preprocessing and identity()."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

from mmkit_plugin_audio_example.encoder import WhisperAudioEncoder, build_encoder, resample
from mmkit_plugin_audio_example.io import Audio
from wavfiles import tone

TINY: dict[str, Any] = {"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
        "num_mel_bins": 16, "chunk_length": 1, "num_tokens": 8}


def _clips() -> list[Audio]:
    return [Audio(tone(f).astype(np.float32), 16000) for f in (220, 880, 3000)]


def _encode(enc: WhisperAudioEncoder, clips: list[Audio]) -> torch.Tensor:
    with torch.no_grad():
        return enc(torch.stack([enc.preprocess(c) for c in clips]))


def _tiny_whisper_checkpoint(path: Path) -> WhisperForConditionalGeneration:
    """A full Whisper model (encoder + decoder) plus its feature extractor, saved the way
    openai/whisper-tiny is laid out on the hub."""
    config = WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                           max_source_positions=50, max_target_positions=16, vocab_size=64, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, begin_suppress_tokens=None)
    torch.manual_seed(1)
    model = WhisperForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=16, chunk_length=1).save_pretrained(path)
    return model


def test_from_pretrained_full_whisper_checkpoint(tmp_path: Path) -> None:
    whisper = _tiny_whisper_checkpoint(tmp_path)
    enc = build_encoder(pretrained=str(tmp_path), num_tokens=5)
    assert (enc.num_tokens, enc.output_dim, enc.input_shape) == (5, 32, (16, 100))
    # The encoder weights are the checkpoint's; the decoder was not loaded.
    theirs = whisper.model.encoder.state_dict()
    ours = enc.model.encoder.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not any("decoder" in name for name, _ in enc.named_parameters())
    # Features = Whisper's own encoder output, average-pooled over time.
    x = torch.stack([enc.preprocess(c) for c in _clips()])
    with torch.no_grad():
        hidden = whisper.model.encoder(input_features=x).last_hidden_state
        expected = torch.nn.functional.adaptive_avg_pool1d(hidden.transpose(1, 2), 5).transpose(1, 2)
        assert torch.allclose(enc(x), expected, atol=1e-6)
    assert enc.identity()["pretrained"] == str(tmp_path)


def test_save_pretrained_round_trip(tmp_path: Path) -> None:
    enc = build_encoder(**{**TINY, "num_tokens": 4}, seed=3)
    enc.save_pretrained(tmp_path)
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in saved and "preprocessor_config.json" in saved
    assert not [name for name in saved if name.endswith((".bin", ".pt", ".pkl"))]  # no pickle
    loaded = build_encoder(pretrained=str(tmp_path), num_tokens=4)
    assert torch.equal(_encode(enc, _clips()), _encode(loaded, _clips()))
    # Overwriting the folder with other weights changes the identity, though the path is the same.
    build_encoder(**{**TINY, "num_tokens": 4}, seed=4).save_pretrained(tmp_path)
    assert build_encoder(pretrained=str(tmp_path), num_tokens=4).identity() != loaded.identity()


def test_checkpoint_without_encoder_weights_is_refused(tmp_path: Path) -> None:
    build_encoder(**TINY).save_pretrained(tmp_path)
    save_file({"something.else": torch.zeros(2)}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no Whisper encoder weights"):
        build_encoder(pretrained=str(tmp_path))


def test_architecture_options_conflict_with_pretrained(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="random-init"):
        build_encoder(pretrained=str(tmp_path), d_model=32)


def test_random_init_is_a_function_of_the_options() -> None:
    torch.manual_seed(123)  # the caller's RNG state must not matter ...
    a = build_encoder(**TINY, seed=7)
    state = torch.random.get_rng_state()
    b = build_encoder(**TINY, seed=7)
    assert torch.equal(state, torch.random.get_rng_state())  # ... nor be consumed
    c = build_encoder(**TINY, seed=8)
    assert torch.equal(_encode(a, _clips()), _encode(b, _clips()))
    assert not torch.allclose(_encode(a, _clips()), _encode(c, _clips()))


def test_identity_tracks_what_changes_outputs() -> None:
    base = build_encoder(**TINY).identity()
    assert base == build_encoder(**TINY).identity()
    for change in ({"seed": 1}, {"num_tokens": 4}, {"init_std": 0.1}, {"hop_length": 320},
                   {"encoder_layers": 2}, {"num_mel_bins": 20}):
        assert build_encoder(**{**TINY, **change}).identity() != base, change


def test_num_tokens_must_fit_the_encoder_frames() -> None:
    with pytest.raises(ValueError, match="num_tokens"):
        build_encoder(**{**TINY, "num_tokens": 51})  # 1 s at hop 160 -> 100 mel frames -> 50 encoder frames


def test_preprocess_pads_cuts_and_resamples() -> None:
    enc = build_encoder(**TINY)
    short, long_ = Audio(tone(440, seconds=0.1).astype(np.float32), 16000), \
        Audio(tone(440, seconds=3.0).astype(np.float32), 16000)
    for clip in (short, long_, (tone(440, seconds=0.5, rate=44100), 44100)):  # (waveform, rate) works too
        x = enc.preprocess(clip)
        assert x.shape == (16, 100) and x.dtype == torch.float32
    # A 440 Hz tone at 8 kHz, once resampled, looks like the same tone recorded at 16 kHz, except
    # in the top mel bins, above the 8 kHz file's 4 kHz Nyquist limit.
    at_8k = enc.preprocess(Audio(tone(440, rate=8000).astype(np.float32), 8000))
    at_16k = enc.preprocess(Audio(tone(440).astype(np.float32), 16000))
    assert torch.allclose(at_8k[:10], at_16k[:10], atol=0.1)
    assert float((at_8k - at_16k).abs().mean()) < 0.02


def test_resample_linear() -> None:
    x = tone(100, seconds=0.1, rate=8000).astype(np.float32)
    assert resample(x, 8000, 8000) is x
    y = resample(x, 8000, 16000)
    assert len(y) == 2 * len(x) and y.dtype == np.float32
    np.testing.assert_allclose(y[::2], x, atol=1e-6)  # original samples are kept
    np.testing.assert_allclose(y[1:-1:2], (x[:-1] + x[1:]) / 2, atol=1e-6)  # midpoints interpolated

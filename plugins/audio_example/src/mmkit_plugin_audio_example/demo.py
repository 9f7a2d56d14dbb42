"""The demo task: "What sound is this?" over synthetic clips of four waveform types.

``mmkit train --modalities audio_example`` with no data argument calls :func:`build_demo`, then
trains a projector (and LoRA) on a tiny random LLM over the *frozen, random-init* demo encoder.
So the classes are chosen to differ in ways a random spectrogram encoder preserves (harmonic
content and noisiness), and every clip gets random pitch, level and phase so that the answer
cannot be read off one fixed pattern. numpy and the standard library only; writes in ~1 s.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from mmkit import DemoTask

from mmkit_plugin_audio_example.io import write_wav

SAMPLE_RATE = 16000
DURATION = 0.5  # seconds; the demo encoder's window is 1 s, so clips are padded with silence
TRAIN_PER_CLASS, TEST_PER_CLASS = 150, 38
QUESTIONS = (
    "<audio>\nWhat sound is this?",
    "<audio>\nWhich waveform do you hear? Answer with one word.",
    "What kind of sound is in this clip?\n<audio>",
    "<audio>\nName the type of this sound.",
)


def _sine(phase: np.ndarray, _rng: np.random.Generator) -> np.ndarray:
    return np.sin(phase)


def _square(phase: np.ndarray, _rng: np.random.Generator) -> np.ndarray:
    return np.sign(np.sin(phase))


def _sawtooth(phase: np.ndarray, _rng: np.random.Generator) -> np.ndarray:
    return 2.0 * ((phase / (2 * np.pi)) % 1.0) - 1.0


def _noise(phase: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(rng.normal(0.0, 0.35, size=phase.shape), -1.0, 1.0)


#: Class name (the answer) -> generator of one period-normalised signal from its phase track.
CLASSES: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "sine": _sine,
    "square": _square,
    "sawtooth": _sawtooth,
    "noise": _noise,
}


def synthesize(kind: str, rng: np.random.Generator) -> np.ndarray:
    """One clip of ``kind`` with random pitch (150-1000 Hz), level, phase and a short fade."""
    n = int(SAMPLE_RATE * DURATION)
    freq = float(np.exp(rng.uniform(np.log(150.0), np.log(1000.0))))
    phase = 2 * np.pi * freq * np.arange(n) / SAMPLE_RATE + rng.uniform(0, 2 * np.pi)
    signal = CLASSES[kind](phase, rng) * rng.uniform(0.3, 0.9)
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.01 * SAMPLE_RATE))
    return (signal * fade).astype(np.float32)  # fade in/out: no click at the edges


def build_demo(root: Path, *, seed: int) -> DemoTask:
    """Write ~750 clips under ``root/clips`` and return balanced train/test records."""
    root = Path(root)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for i in range(per_class):
            for kind in CLASSES:  # interleaved, so any prefix of a split is balanced too
                clip_id = f"{split}-{kind}-{i:03d}"
                relative = f"clips/{clip_id}.wav"
                write_wav(root / relative, synthesize(kind, rng), SAMPLE_RATE)
                question = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
                splits[split].append({
                    "id": clip_id,
                    "audio": relative,
                    "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": kind}],
                })
    return DemoTask(train=splits["train"], test=splits["test"], answers=tuple(CLASSES))

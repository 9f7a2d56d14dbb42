"""Procedural surface samples of simple solids, for the demo task (numpy only)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Sampler = Callable[[np.random.Generator, int], np.ndarray]


def sphere(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def cube(rng: np.random.Generator, n: int) -> np.ndarray:
    # Six equal faces: pick a face, sample uniformly on it.
    pts = rng.uniform(-1, 1, size=(n, 3))
    axis = rng.integers(0, 3, size=n)
    pts[np.arange(n), axis] = rng.choice([-1.0, 1.0], size=n)
    return pts


def cylinder(rng: np.random.Generator, n: int, radius: float = 0.7, height: float = 2.0) -> np.ndarray:
    side, cap = 2 * np.pi * radius * height, np.pi * radius ** 2  # area-proportional choice
    on_side = rng.random(n) < side / (side + 2 * cap)
    theta = rng.uniform(0, 2 * np.pi, size=n)
    r = np.where(on_side, radius, radius * np.sqrt(rng.random(n)))
    z = np.where(on_side, rng.uniform(-height / 2, height / 2, size=n),
                 rng.choice([-height / 2, height / 2], size=n))
    return np.stack([r * np.cos(theta), r * np.sin(theta), z], axis=1)


def cone(rng: np.random.Generator, n: int, radius: float = 1.0, height: float = 2.0) -> np.ndarray:
    slant = np.hypot(radius, height)
    lateral, base = np.pi * radius * slant, np.pi * radius ** 2
    on_side = rng.random(n) < lateral / (lateral + base)
    theta = rng.uniform(0, 2 * np.pi, size=n)
    t = np.sqrt(rng.random(n))  # area grows linearly with distance from the apex
    r = radius * t
    z = np.where(on_side, height / 2 - height * t, -height / 2)
    return np.stack([r * np.cos(theta), r * np.sin(theta), z], axis=1)


def torus(rng: np.random.Generator, n: int, major: float = 1.0, minor: float = 0.3) -> np.ndarray:
    # Rejection on the tube angle makes the samples area-uniform (outer side has more area).
    out = np.empty((0, 3))
    while len(out) < n:
        u = rng.uniform(0, 2 * np.pi, size=2 * n)
        v = rng.uniform(0, 2 * np.pi, size=2 * n)
        keep = rng.random(2 * n) < (major + minor * np.cos(v)) / (major + minor)
        u, v = u[keep], v[keep]
        ring = major + minor * np.cos(v)
        out = np.concatenate([out, np.stack([ring * np.cos(u), ring * np.sin(u), minor * np.sin(v)], axis=1)])
    return out[:n]


SHAPES: dict[str, Sampler] = {"sphere": sphere, "cube": cube, "cylinder": cylinder, "cone": cone, "torus": torus}


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3-D rotation (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def sample_shape(name: str, rng: np.random.Generator, n: int, *, scale_jitter: float = 0.15,
                 noise: float = 0.01) -> np.ndarray:
    """``n`` surface points of ``name``: anisotropic scale jitter, random rotation, Gaussian noise."""
    pts = SHAPES[name](rng, n)
    pts = pts * rng.uniform(1 - scale_jitter, 1 + scale_jitter, size=3)
    pts = pts @ random_rotation(rng).T
    pts = pts + rng.normal(scale=noise, size=pts.shape)
    return pts * rng.uniform(0.5, 2.0) + rng.normal(scale=0.5, size=3)  # any size, anywhere

"""A PointNet++-style set-abstraction encoder on torch-geometric layers.

Each level picks centres by farthest-point sampling, groups each centre's k nearest points and runs
``torch_geometric.nn.PointNetConv`` (shared MLP on ``[feature_j, pos_j - pos_i]``, max-pooled) on the
bipartite graph points -> centres. The last level's centres are the tokens: their pooled features
plus an embedding of the centre position, optionally mixed by a small transformer.

Weights are stored as ``config.json`` + ``model.safetensors`` (the Hugging Face Hub layout), loaded
with strict key and shape checks.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch_geometric.nn import MLP, PointNetConv

from mmkit.errors import CheckpointMismatchError, ConfigError
from mmkit.modeling.encoder import ModalityEncoder
from mmkit_plugin_pointcloud.config import PointNet2Config
from mmkit_plugin_pointcloud.sampling import farthest_point_sample, gather_points, knn, normalise_cloud, resample

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_FORMAT = "mmkit-pointnet2"


class PointNet2Encoder(ModalityEncoder):
    """Point cloud ``[B, num_points, in_channels]`` -> tokens ``[B, centres[-1], output_dim]``."""

    def __init__(self, config: PointNet2Config, *, pretrained: str | None = None):
        super().__init__()
        self.config = config
        self.pretrained = pretrained
        self.weights_sha256: str | None = None
        self.num_tokens = config.num_tokens
        self.output_dim = config.output_dim
        self.input_shape = (config.num_points, config.in_channels)
        # Seeded init in a forked RNG: a random-init encoder is reproducible across processes (its
        # identity names the seed) without disturbing the caller's random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self._build(config)

    def _build(self, config: PointNet2Config) -> None:
        invariant = int(config.invariant_features)
        self.levels = nn.ModuleList()
        feat_dim = config.in_channels - 3 + invariant  # colour, then the distance from the centroid
        for width in config.widths:
            # LayerNorm per point ("node" mode) keeps activations in range at random init while
            # staying independent of the other clouds in the batch (BatchNorm would not).
            local: nn.Module = MLP([feat_dim + 3 + invariant, width, width, width], norm="layer_norm",
                                   norm_kwargs={"mode": "node"}, plain_last=False)
            if invariant:
                local = nn.Sequential(AppendEdgeLength(), local)
            self.levels.append(PointNetConv(local_nn=local, add_self_loops=False))
            feat_dim = width
        self.feature_proj = nn.Linear(feat_dim, config.output_dim)
        self.position_embed = MLP([3 + invariant, config.output_dim, config.output_dim], norm=None)
        self.transformer: nn.Module | None = None
        if config.transformer_layers:
            layer = nn.TransformerEncoderLayer(config.output_dim, config.num_heads, dim_feedforward=2 * config.output_dim,
                                               dropout=0.0, batch_first=True, norm_first=True)
            self.transformer = nn.TransformerEncoder(layer, config.transformer_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.output_dim)

    # -- preprocessing (data-loader workers; no weights needed) ------------------------------------
    def preprocess(self, raw: Any) -> Tensor:
        """``[N, 3]`` or ``[N, 6]`` points -> ``[num_points, in_channels]``: centred at the centroid,
        scaled into the unit sphere, FPS-subsampled (from point 0) or cyclically repeated to exactly
        ``num_points``; colours zero-filled when absent (6 channels) or dropped (3 channels)."""
        points = raw.detach().cpu().numpy() if isinstance(raw, Tensor) else np.asarray(raw)
        if points.ndim != 2 or points.shape[1] not in (3, 6) or points.shape[0] == 0:
            raise ValueError(f"expected a non-empty N x 3 or N x 6 point array, got shape {points.shape}")
        xyz = normalise_cloud(points[:, :3])
        if self.config.in_channels == 6:
            rgb = points[:, 3:] if points.shape[1] == 6 else np.zeros_like(xyz)
            xyz = np.concatenate([xyz, rgb], axis=1)
        return torch.from_numpy(np.ascontiguousarray(resample(xyz, self.config.num_points), dtype=np.float32))

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected input [B, {self.input_shape[0]}, {self.input_shape[1]}], got {tuple(x.shape)}")
        batch = x.shape[0]
        dtype = self.feature_proj.weight.dtype  # the layers' dtype (bf16/fp16 under mixed precision)
        pos = x[..., :3].float()  # sampling and grouping stay float32 whatever the layers run in
        feat: Tensor | None = x[..., 3:].to(dtype) if x.shape[-1] > 3 else None
        if self.config.invariant_features:
            radius = pos.norm(dim=-1, keepdim=True).to(dtype)
            feat = radius if feat is None else torch.cat([feat, radius], dim=-1)
        # FPS from point 0 of an FPS-ordered prefix is that prefix, so one FPS run gives every
        # level's centres (level l = the first centres[l] picks).
        order = farthest_point_sample(pos, self.config.centres[0])
        for level, conv in enumerate(self.levels):
            m, k = self.config.centres[level], self.config.neighbours[level]
            n = pos.shape[1]
            centre_index = order[:, :m] if level == 0 else torch.arange(m, device=x.device).expand(batch, m)
            centre_pos = gather_points(pos, centre_index)
            neighbours = knn(centre_pos, pos, k)  # [B, m, k]
            offsets = torch.arange(batch, device=x.device).view(batch, 1, 1)
            source = (neighbours + offsets * n).reshape(-1)
            target = torch.arange(batch * m, device=x.device).repeat_interleave(k)
            edge_index = torch.stack([source, target])
            flat_feat = feat.reshape(batch * n, -1) if feat is not None else None
            positions = (pos.reshape(batch * n, 3).to(dtype), centre_pos.reshape(batch * m, 3).to(dtype))
            out = conv((flat_feat, None), positions, edge_index)
            feat, pos = out.view(batch, m, -1), centre_pos
        assert feat is not None
        where = torch.cat([pos, pos.norm(dim=-1, keepdim=True)], dim=-1) if self.config.invariant_features else pos
        tokens = self.feature_proj(feat) + self.position_embed(where.to(dtype))
        if self.transformer is not None:
            tokens = self.transformer(tokens)
        return self.norm(tokens)

    # -- identity and persistence ------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "plugin_version": _plugin_version(),
            "pretrained": self.pretrained,
            "weights_sha256": self.weights_sha256,
            "init": "pretrained" if self.pretrained else f"random (seed {self.config.seed})",
            "config": self.config.to_dict(),
            "preprocessing": {
                "centre": "centroid", "scale": "unit sphere (max radius 1)",
                "resample": f"farthest-point sampling from point 0, or cyclic repeat, to {self.config.num_points}",
                "colour": "rgb in [0, 1], zeros when absent" if self.config.in_channels == 6 else "dropped",
            },
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: t.detach().to("cpu").contiguous() for name, t in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": _FORMAT})
        meta = {"format": _FORMAT, "encoder": "pointnet2", "plugin_version": _plugin_version(),
                "config": self.config.to_dict()}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, pretrained: str | Path, **overrides: Any) -> PointNet2Encoder:
        """Load from a local directory or a Hub repo id. ``overrides`` may change options that keep
        the weight shapes (``num_points``, ``centres``, ``neighbours``); others fail the strict load."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        config_path, weights_path = _locate(str(pretrained))
        try:
            meta = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{config_path}: unreadable encoder config: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT or not isinstance(meta.get("config"), dict):
            raise ConfigError(f"{config_path}: not a pointnet2 encoder config (expected format {_FORMAT!r})")
        config = PointNet2Config.from_dict({**meta["config"], **overrides})
        model = cls(config, pretrained=str(pretrained))
        try:
            state = load_file(str(weights_path))
        except (OSError, SafetensorError) as exc:
            raise CheckpointMismatchError(f"{weights_path}: unreadable safetensors file: {exc}") from exc
        _check_state(model, state, weights_path)
        model.load_state_dict(state, strict=True)
        model.weights_sha256 = _sha256(weights_path)
        return model


class AppendEdgeLength(nn.Module):
    """Appends ``|pos_j - pos_i|`` to PointNetConv messages ``[x_j, pos_j - pos_i]`` (the offset is
    always the last three columns): a rotation-invariant cue for the shared MLP."""

    def forward(self, message: Tensor) -> Tensor:
        return torch.cat([message, message[:, -3:].norm(dim=-1, keepdim=True)], dim=-1)


def build_encoder(*, pretrained: str | None = None, **config: Any) -> PointNet2Encoder:
    """The ``EncoderSpec.build`` entry: random init from ``config``, or ``from_pretrained``."""
    if pretrained is not None:
        return PointNet2Encoder.from_pretrained(pretrained, **config)
    return PointNet2Encoder(PointNet2Config.from_dict(config))


def _locate(pretrained: str) -> tuple[Path, Path]:
    local = Path(pretrained).expanduser()
    if local.is_dir():
        paths = local / CONFIG_FILE, local / WEIGHTS_FILE
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise ConfigError(f"{local}: pretrained encoder directory lacks {' and '.join(missing)}")
        return paths
    if local.exists() or pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1:
        raise ConfigError(f"{pretrained}: not a pretrained encoder directory (and not a Hub repo id)")
    try:
        from huggingface_hub import hf_hub_download

        return (Path(hf_hub_download(pretrained, CONFIG_FILE)), Path(hf_hub_download(pretrained, WEIGHTS_FILE)))
    except Exception as exc:  # offline, unknown repo, bad id, ...: one clear message either way
        raise ConfigError(f"{pretrained}: no such local directory, and fetching {CONFIG_FILE} / {WEIGHTS_FILE} "
                          f"from the Hugging Face Hub failed: {type(exc).__name__}: {exc}") from exc


def _check_state(model: nn.Module, state: dict[str, Tensor], where: Path) -> None:
    """Compare keys and shapes before loading so the error lists every mismatch (never strict=False)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} ({', '.join(unexpected[:5])}{', ...' if len(unexpected) > 5 else ''})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) ({'; '.join(shapes[:3])}{'; ...' if len(shapes) > 3 else ''})")
        raise CheckpointMismatchError(f"{where}: weights do not fit the pointnet2 encoder configuration: "
                                      + "; ".join(parts))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _plugin_version() -> str:
    try:
        return version("mmkit-plugin-pointcloud")
    except PackageNotFoundError:
        return "unknown"

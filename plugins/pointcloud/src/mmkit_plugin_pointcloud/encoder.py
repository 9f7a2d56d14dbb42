"""A PointNet++-style set-abstraction encoder on torch-geometric layers.

Each level picks centres by farthest-point sampling, groups each centre's k nearest points and runs
``torch_geometric.nn.PointNetConv`` (shared MLP on ``[feature_j, pos_j - pos_i]``, max-pooled) on the
bipartite graph points -> centres. The last level's centres are the tokens: their pooled features
plus an embedding of the centre position, optionally mixed by a small transformer. Sampling and
grouping need no weights, so ``preprocess`` computes them once per cloud and returns them beside the
points, as a :class:`~mmkit_plugin_pointcloud.layout.GroupedCloud` (int64 indices, exact whatever
dtype the layers run in); forward only gathers.

Weights are stored as ``config.json`` + ``model.safetensors`` (the Hugging Face Hub layout), loaded
with strict key and shape checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from mmkit.modeling import PretrainedEncoder
from torch import Tensor, nn
from torch_geometric.nn import MLP, PointNetConv

from mmkit_plugin_pointcloud import layout
from mmkit_plugin_pointcloud.config import PointNet2Config
from mmkit_plugin_pointcloud.layout import GroupedCloud, group
from mmkit_plugin_pointcloud.sampling import gather_points, normalise_cloud, resample


class PointNet2Encoder(PretrainedEncoder):
    """Point cloud ``[B, num_points, in_channels]`` -> tokens ``[B, centres[-1], output_dim]``.
    :class:`PretrainedEncoder` gives the seeded init, ``config.json`` + ``model.safetensors``
    persistence, the weights hash and ``identity()``."""

    def __init__(self, config: dict[str, Any]):
        config, legacy_seed = _unwrap_legacy(config)
        cfg = PointNet2Config.from_dict(config)  # validated; refuses unknown options
        super().__init__(cfg.to_dict())
        self._legacy_seed = legacy_seed  # set when loaded from a folder saved by releases up to 0.1.0
        self.cfg = cfg
        self.num_tokens = cfg.num_tokens
        self.output_dim = cfg.output_dim
        # a GroupedCloud (points + int64 grouping), not one tensor shape: collate and blank are ours
        self.input_shape = None
        self._build(cfg)

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
    def preprocess(self, raw: Any) -> GroupedCloud:
        """``[N, 3]`` or ``[N, 6]`` points -> a :class:`GroupedCloud`: the points, centred at the
        centroid, scaled into the unit sphere, FPS-subsampled (from point 0) or cyclically repeated to
        exactly ``num_points``, colours zero-filled when absent (6 channels) or dropped (3 channels);
        then every level's FPS centres and kNN groups (int64), which depend on the points alone, so
        they are computed here once instead of in every training step."""
        grouped = group(self.prepare_points(raw)[None], self.cfg)
        return GroupedCloud(grouped.points[0], grouped.centres[0], tuple(n[0] for n in grouped.neighbours))

    def collate(self, items: Sequence[GroupedCloud]) -> GroupedCloud:
        """Preprocessed clouds (or collated batches of them) -> one batch, each field stacked."""
        return layout.collate(items)

    def blank(self, batch_size: int = 1) -> GroupedCloud:
        """``batch_size`` all-zero clouds with their grouping, collated."""
        return layout.blank(self.cfg, batch_size)

    def blank_item(self) -> GroupedCloud:
        """One all-zero cloud with its grouping, as ``preprocess`` returns (the evaluation ablation's input)."""
        one = self.blank(1)
        return GroupedCloud(one.points[0], one.centres[0], tuple(n[0] for n in one.neighbours))

    def prepare_points(self, raw: Any) -> Tensor:
        """``[N, 3]`` or ``[N, 6]`` points -> ``[num_points, in_channels]`` float32 (the points part
        of :meth:`preprocess`; the input a stock PointNet++ takes)."""
        points = raw.detach().cpu().numpy() if isinstance(raw, Tensor) else np.asarray(raw)
        if points.ndim != 2 or points.shape[1] not in (3, 6) or points.shape[0] == 0:
            raise ValueError(f"expected a non-empty N x 3 or N x 6 point array, got shape {points.shape}")
        xyz = normalise_cloud(points[:, :3])
        if self.cfg.in_channels == 6:
            rgb = points[:, 3:] if points.shape[1] == 6 else np.zeros_like(xyz)
            xyz = np.concatenate([xyz, rgb], axis=1)
        return torch.from_numpy(np.ascontiguousarray(resample(xyz, self.cfg.num_points), dtype=np.float32))

    def stock_input(self, batch: GroupedCloud | Tensor) -> Tensor:
        """The points ``[B, num_points, in_channels]`` of a collated batch: what a stock PointNet++
        is fed, leaving it to sample and group in every forward (``mmkit bench``'s plain loop does)."""
        return batch.points if isinstance(batch, GroupedCloud) else batch

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: GroupedCloud | Tensor) -> Tensor:
        """A collated :class:`GroupedCloud` batch (grouping precomputed), or bare points ``[B,
        num_points, in_channels]`` (grouped here, as before the grouping moved into ``preprocess``)."""
        if isinstance(x, GroupedCloud):
            layout.check(x, self.cfg)
            return self._encode(x)
        points = (self.cfg.num_points, self.cfg.in_channels)
        if isinstance(x, Tensor) and x.dim() == 3 and tuple(x.shape[1:]) == points:
            return self._encode(group(x, self.cfg))
        got = f"a tensor of shape {list(x.shape)}" if isinstance(x, Tensor) else f"a {type(x).__name__}"
        raise ValueError(f"expected a collated GroupedCloud batch or points [B, {', '.join(map(str, points))}], got {got}")

    def _encode(self, grouping: GroupedCloud) -> Tensor:
        x = grouping.points
        batch = x.shape[0]
        dtype = self.feature_proj.weight.dtype  # the layers' dtype (bf16/fp16 under mixed precision)
        pos = x[..., :3].float()  # positions stay float32 whatever the layers run in
        feat: Tensor | None = x[..., 3:].to(dtype) if x.shape[-1] > 3 else None
        if self.cfg.invariant_features:
            radius = pos.norm(dim=-1, keepdim=True).to(dtype)
            feat = radius if feat is None else torch.cat([feat, radius], dim=-1)
        for level, conv in enumerate(self.levels):
            m, k = self.cfg.centres[level], self.cfg.neighbours[level]
            n = pos.shape[1]
            # level 0's centres in FPS order; level l's are the first centres[l] of level l-1's
            centre_pos = gather_points(pos, grouping.centres.to(x.device)) if level == 0 else pos[:, :m]
            neighbours = grouping.neighbours[level].to(x.device)  # [B, m, k]
            offsets = torch.arange(batch, device=x.device).view(batch, 1, 1)
            source = (neighbours + offsets * n).reshape(-1)
            target = torch.arange(batch * m, device=x.device).repeat_interleave(k)
            edge_index = torch.stack([source, target])
            flat_feat = feat.reshape(batch * n, -1) if feat is not None else None
            positions = (pos.reshape(batch * n, 3).to(dtype), centre_pos.reshape(batch * m, 3).to(dtype))
            out = conv((flat_feat, None), positions, edge_index)
            feat, pos = out.view(batch, m, -1), centre_pos
        assert feat is not None
        where = torch.cat([pos, pos.norm(dim=-1, keepdim=True)], dim=-1) if self.cfg.invariant_features else pos
        tokens = self.feature_proj(feat) + self.position_embed(where.to(dtype))
        if self.transformer is not None:
            tokens = self.transformer(tokens)
        return self.norm(tokens)

    def legacy_identities(self) -> list[dict[str, Any]]:
        """Identities earlier releases recorded for these same features:

        - before the grouping moved into ``preprocess``: today's identity without the ``grouping``
          line (the features are bitwise the same in float32: the same FPS and kNN on the same
          float32 points, only computed earlier);
        - releases up to 0.1.0: the seed inside the config, an ``init`` line, the plugin version, and
          as ``weights_sha256`` the saved weights file's hash (none for random init: a run stores those
          weights itself, in its hash-checked ``encoders.safetensors``)."""
        out = [{**self.identity(), "preprocessing": self._points_preprocessing()}]
        if self.pretrained is None and self.seed is not None:
            seed, weights = self.seed, None
        elif self.pretrained is not None and self._legacy_seed is not None:
            seed, weights = self._legacy_seed, _file_sha256(self._locate(self.pretrained)[1])
        else:
            return out  # a folder in the current layout: no release up to 0.1.0 could have read it
        ident = {"class": f"{type(self).__module__}.{type(self).__qualname__}", "pretrained": self.pretrained,
                 "weights_sha256": weights, "init": "pretrained" if self.pretrained else f"random (seed {seed})",
                 "config": {**self.config, "seed": seed}, "preprocessing": self._points_preprocessing()}
        return out + [{**ident, "plugin_version": version} for version in _LEGACY_VERSIONS]

    def describe_preprocessing(self) -> dict[str, Any]:
        # worded as when the grouping was stored after the points in one vector: the features are the
        # same, so the identity (the feature cache's key) stays
        return {**self._points_preprocessing(),
                "grouping": "per level, FPS centres and kNN groups of the float32 points, stored after them"}

    def _points_preprocessing(self) -> dict[str, Any]:
        return {"centre": "centroid", "scale": "unit sphere (max radius 1)",
                "resample": f"farthest-point sampling from point 0, or cyclic repeat, to {self.cfg.num_points}",
                "colour": "rgb in [0, 1], zeros when absent" if self.cfg.in_channels == 6 else "dropped"}


class AppendEdgeLength(nn.Module):
    """Appends ``|pos_j - pos_i|`` to PointNetConv messages ``[x_j, pos_j - pos_i]`` (the offset is
    always the last three columns): a rotation-invariant cue for the shared MLP."""

    def forward(self, message: Tensor) -> Tensor:
        return torch.cat([message, message[:, -3:].norm(dim=-1, keepdim=True)], dim=-1)


#: ``plugin_version`` values in identities of the earlier format ("unknown": run from a source tree).
_LEGACY_VERSIONS = ("0.1.0", "unknown")
_LEGACY_FORMAT = "mmkit-pointnet2"


def _unwrap_legacy(config: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """A ``config.json`` saved by releases up to 0.1.0 nests the options under ``config`` (with the
    random-init ``seed`` among them) beside ``format``/``encoder``/``plugin_version``: read it as the
    options (plus any overrides) and that seed, so such a folder still loads."""
    if config.get("format") != _LEGACY_FORMAT or not isinstance(config.get("config"), dict):
        return dict(config), None
    overrides = {k: v for k, v in config.items() if k not in ("format", "encoder", "plugin_version", "config")}
    options = {**config["config"], **overrides}
    return options, int(options.pop("seed", 0))


def _file_sha256(path: Any) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: The ``EncoderSpec.build`` entry: seeded random init from the options, or ``from_pretrained``
#: (a folder or Hub repo id; options that keep the weight shapes, such as ``num_points``, may be overridden).
build_encoder = PointNet2Encoder.build

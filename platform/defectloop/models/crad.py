"""CRAD: a continuous memory of normal features, read at predicted grid coordinates.

DESIGN.md section 5, adapted to our backbones (measurements and the choices they led to:
docs/crad.md):

- a local grid (C x R_l x R_l) is sampled by bilinear interpolation at a 2-D coordinate predicted
  for every patch position, a global grid (R_g x R_g nodes, each a whole C x H x W map) at one
  coordinate predicted per image; coordinates come from tanh-bounded 1x1-conv / MLP heads;
- MobileNetV3-style bottlenecks fuse the two sampled maps into a "normal" reconstruction f_n;
- the anomaly map is |x_hat - x| per position, x_hat = f_n by default; the optional refinement
  (``refine``) blends it with the input, x_hat = S x + (1 - S) f_n with
  S = 0.3 [mse <= 10] + 0.7 cos(f_n, x);
- features are centred and scaled per cluster of images (:class:`ClusterStats`), so one unified
  model centres each category on its own mean without category labels.

The grids can only hold normal features and the fusion network never sees x itself, so anomalies
are not reproduced (no identity shortcut). Training: models/crad_training.py.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score
from torch import nn

from defectloop.memory import IndexFactory, build_index
from defectloop.models.base import AnomalyModel
from defectloop.models.config import ModelConfig


def bilinear_weights(coord: torch.Tensor, res: int) -> torch.Tensor:
    """Interpolation weights of N points (x, y in [-1, 1]) over the res x res nodes of a grid.

    The same as ``F.grid_sample(..., align_corners=False, padding_mode="zeros")``, written as an
    N x res^2 matrix so that sampling is one GEMM: grid_sample on a grid expanded over the batch is
    far slower on CPU, above all for the global grid whose "channels" are whole feature maps.
    """
    p = ((coord + 1) * res - 1) / 2  # N x 2, in node units
    nodes = torch.arange(res, dtype=coord.dtype, device=coord.device)
    w = (1 - (p[:, :, None] - nodes).abs()).clamp_min(0)  # N x 2 x res (hat function per axis)
    return (w[:, 1, :, None] * w[:, 0, None, :]).flatten(1)  # row = y node, column = x node


class SqueezeExcite(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(ch, max(8, ch // 4)), nn.ReLU(), nn.Linear(max(8, ch // 4), ch),
                                nn.Hardsigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean((2, 3)))[:, :, None, None]


class Bottleneck(nn.Module):
    """MobileNetV3 inverted residual at stride 1: expand 1x1, depthwise 3x3, SE, project 1x1."""

    def __init__(self, ch: int, expanded: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(ch, expanded, 1, bias=False), nn.BatchNorm2d(expanded), nn.Hardswish(),
            nn.Conv2d(expanded, expanded, 3, padding=1, groups=expanded, bias=False), nn.BatchNorm2d(expanded),
            SqueezeExcite(expanded), nn.Hardswish(),
            nn.Conv2d(expanded, ch, 1, bias=False), nn.BatchNorm2d(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ClusterStats(nn.Module):
    """Centring and scaling per cluster of images, found without category labels.

    One mean for every category centres each category off its own mean; per cluster of the images'
    mean feature vectors (k-means, the number of clusters by silhouette), a unified model gets each
    category's statistics back while staying one model. An image takes the statistics of the
    nearest cluster mean (its k-means centroid), at training and at scoring alike. Each cluster
    has one scale (the root mean square of its channels' standard deviations), so the error weighs
    channels as the backbone does.
    """

    max_clusters = 16
    min_silhouette = 0.5  # single dev categories split at 0.23-0.43, mixtures of them at 0.58-0.61

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, dim))
        self.register_buffer("std", torch.ones(1, dim))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the number of clusters is learned: take the saved shapes
        for name in ("mean", "std"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self.mean.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def assign(self, feats: torch.Tensor) -> torch.Tensor:
        """Cluster of each image (B x C x H x W features -> B)."""
        return torch.cdist(feats.mean((2, 3)), self.mean).argmin(1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        k = self.assign(feats)
        return (feats - self.mean[k, :, None, None]) / self.std[k, :, None, None]

    @torch.no_grad()
    def fit(self, image_mean: torch.Tensor, image_sq: torch.Tensor, clusters: int = 0, seed: int = 0) -> None:
        """Set from each image's per-channel mean and mean square (N x C each, every fit image).

        ``clusters``: 0 chooses the number, 1 is one set of statistics for all images."""
        labels = cluster_images(image_mean.double().numpy(), clusters, self.max_clusters, self.min_silhouette, seed)
        k = int(labels.max()) + 1
        labels = torch.from_numpy(labels)
        counts = torch.bincount(labels, minlength=k).double()[:, None]
        mean = torch.zeros(k, image_mean.shape[1], dtype=torch.float64).index_add_(0, labels, image_mean.double()) / counts
        sq = torch.zeros_like(mean).index_add_(0, labels, image_sq.double()) / counts
        scale = (sq - mean.pow(2)).clamp_min(0).mean(1, keepdim=True).sqrt().clamp_min(1e-6)
        device = self.mean.device
        self.mean = mean.float().to(device)
        self.std = scale.expand_as(mean).float().contiguous().to(device)


def cluster_images(points: np.ndarray, clusters: int, max_clusters: int, min_silhouette: float,
                   seed: int) -> np.ndarray:
    """k-means labels (0..K-1) of N points; K = ``clusters``, or by silhouette when 0.

    K > 1 is kept only when its silhouette reaches ``min_silhouette`` and every cluster holds at
    least 8 images (enough for statistics), so one category is not split on its own spread."""
    n = len(points)
    if clusters == 1 or n < 16:
        return np.zeros(n, dtype=np.int64)

    def fit(k: int) -> np.ndarray:
        return KMeans(k, n_init=4, random_state=seed).fit_predict(points)

    if clusters > 1:
        return fit(min(clusters, n)).astype(np.int64)
    best, best_score = np.zeros(n, dtype=np.int64), min_silhouette
    for k in range(2, min(max_clusters, n // 8) + 1):
        labels = fit(k)
        if np.bincount(labels).min() < 8:
            continue
        score = silhouette_score(points, labels, sample_size=min(n, 2000), random_state=seed)
        if score >= best_score:
            best, best_score = labels.astype(np.int64), score
    return best


class CRADHead(nn.Module):
    """Continuous-memory reconstruction of C x H x W (centred, scaled) patch features."""

    def __init__(self, dim: int, grid_hw: tuple[int, int], local_res: int = 16, global_res: int = 4,
                 width: int | None = None, expansion: int = 2, layers: int = 2, use_global: bool = True,
                 refine: bool = True):
        super().__init__()
        h, w = grid_hw
        self.dim, self.grid_hw, self.use_global, self.refine = dim, (h, w), use_global, refine
        self.local_coord = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.Tanh(), nn.Conv2d(dim, 2, 1), nn.Tanh())
        self.local_grid = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, dim, local_res, local_res)))
        fused = dim
        if use_global:
            self.global_coord = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, 2), nn.Tanh())
            self.global_grid = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, dim * h * w, global_res, global_res)))
            fused = 2 * dim
        width = width or dim
        self.stem = nn.Conv2d(fused, width, 1, bias=False)
        self.blocks = nn.Sequential(*[Bottleneck(width, expansion * width) for _ in range(layers)])
        self.out = nn.Conv2d(width, dim, 1, bias=False)
        self.stats = ClusterStats(dim)

    def grids(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.endswith("_grid")]

    def normalise(self, feats: torch.Tensor) -> torch.Tensor:
        return self.stats(feats)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # versions before per-cluster statistics saved one mean and std (C each) on the head
        for name in ("mean", "std"):
            if prefix + name in state_dict:
                state_dict[f"{prefix}stats.{name}"] = state_dict.pop(prefix + name)[None]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reconstruct(self, x: torch.Tensor, jitter: float = 0.0) -> torch.Tensor:
        """Normal reconstruction f_n of standardised features x (B x C x H x W)."""
        b, c, h, w = x.shape
        coord = self.local_coord(x).permute(0, 2, 3, 1).reshape(-1, 2)  # B*H*W x 2
        if jitter > 0:
            coord = coord + jitter * torch.randn_like(coord)
        local = bilinear_weights(coord, self.local_grid.shape[-1]) @ self.local_grid.flatten(2)[0].T
        parts = [local.view(b, h, w, c).permute(0, 3, 1, 2)]
        if self.use_global:
            g = bilinear_weights(self.global_coord(x.mean((2, 3))), self.global_grid.shape[-1])  # B x R^2
            parts.insert(0, (g @ self.global_grid.flatten(2)[0].T).view(b, c, h, w))
        return self.out(self.blocks(self.stem(torch.cat(parts, 1))))

    def forward(self, x: torch.Tensor, jitter: float = 0.0) -> torch.Tensor:
        """Refined reconstruction x_hat of standardised features x."""
        f_n = self.reconstruct(x, jitter)
        if not self.refine:
            return f_n
        mse = (f_n - x).pow(2).mean(1, keepdim=True)
        s = 0.3 * (mse <= 10).float() + 0.7 * F.cosine_similarity(f_n, x, dim=1)[:, None]
        return s * x + (1 - s) * f_n


class CRAD(AnomalyModel):
    """The scoring module: the head's reconstruction error per patch."""

    kind = "crad"
    uses_normal_bank = False

    def __init__(self, config: ModelConfig, index: IndexFactory = build_index):
        super().__init__(config, index)
        cfg = config.crad
        grid = self.embedder.grid(config.image_size)
        self.head = CRADHead(self.dim, (grid, grid), cfg.local_res, cfg.global_res, cfg.width or None,
                             cfg.expansion, cfg.layers, cfg.use_global, cfg.refine)

    @torch.no_grad()
    def patch_scores(self, feats: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Every patch, ``keep`` or not: the network reads the whole grid at once."""
        x = self.head.normalise(feats)
        return (self.head(x) - x).norm(dim=1)

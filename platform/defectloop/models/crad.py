"""CRAD: a continuous memory of normal features, read at predicted grid coordinates.

DESIGN.md section 5, adapted to our backbones:

- a local grid (C x R_l x R_l) is sampled by bilinear interpolation at a 2-D coordinate predicted
  for every patch position, a global grid (R_g x R_g nodes, each a whole C x H x W map) at one
  coordinate predicted per image; coordinates come from tanh-bounded 1x1-conv / MLP heads;
- MobileNetV3-style bottlenecks fuse the two sampled maps into a "normal" reconstruction f_n;
- the anomaly map is |x_hat - x| per position, x_hat = f_n by default; the optional refinement
  (``crad_refine``) blends it with the input, x_hat = S x + (1 - S) f_n with
  S = 0.3 [mse <= 10] + 0.7 cos(f_n, x). It is off because on our centred features a normal
  patch near the channel means has a near-zero vector, hence a noisy cosine and a large 1 - S:
  unified on the dev set it cost 10 points of pixel AUROC (81.6 with it, 88.5 without; screw
  89.4 vs 98.5). Measured alternatives that did not close the gap: scaling without centring
  (screw 89.3) and training with the blend but scoring f_n (93.4);
- the image score is the most anomalous 32 px window of the smoothed map, as in the published
  CRAD (now every model's, ``AnomalyModel.image_scores``);
- known limit, measured on magnetic tile alone (10 epochs): pixel AUROC 77.8 against PatchCore's
  83.6, all of it on the large "uneven" defects (73.8 against 87.5; blowhole, break and fray
  97-99 for both). The lead is image-level: PatchCore's per-image mean distance alone scores
  90.2 there and its maps centred per image 60.6, CRAD's 78.7 and 61.0. A reconstruction adapts
  to a whole tile's uneven texture. Channel- or position-wise normalisation of the error, input
  feature noise, a 4 x 4 local grid, no global grid, one fusion layer, no spatial mixing in the
  fusion, coordinate jitter 0.2: each within 1 point (77.2-78.7). Length of training does help a
  model of magnetic tile alone: 80.1 after 10 epochs, 82.4 after 40 (552 s), 84.6 after 100
  (1471 s), above PatchCore; training on random 16 x 16 windows of the 32 x 32 maps (epochs 2.5x
  cheaper) did not buy it: 120 epochs in 660 s, 81.2. Capacity does not help: in the
  unified model a 32 x 32 local grid (79.8), an 8 x 8 global grid (79.6, 1359 s) and fusion
  without BatchNorm (79.7) change nothing. The feature statistics do: magnetic tile alone, centred
  and scaled with the unified mean and scale instead of its own, falls from 82.4 to 80.1, mostly
  by the mean (81.9 with the unified scale alone). Hence statistics per cluster of images
  (:class:`ClusterStats`): unified, magnetic tile 79.8 -> 80.8;
- trained with MSE(x_hat, x) on normal features only, local coordinates jittered during training,
  AdamW with a large learning rate for the grids and a small one for the network.

The grids can only hold normal features and the fusion network never sees x itself, so anomalies
are not reproduced (no identity shortcut). Sizes follow the backbone (C) and the feature grid
(H x W). Features are centred per channel and divided by ONE scale (the root mean square of the
channels' standard deviations), both per cluster of training images (k-means on the images' mean
features, no category labels; each image takes its nearest cluster's statistics): one set of
hyper-parameters fits any backbone, the error weighs channels as the backbone does (as PatchCore's
distance does), and each category is centred on its own mean. Unit variance per channel amplified
low-variance channels (magnetic tile alone, 10 epochs, 2 fusion layers: pixel AUROC 77.8 with it,
78.9 with one scale, 80.1 with one scale and a 16 x 16 local grid).

The backbone stays frozen: the head trains on cached features, and the epoch with the lowest loss
on held-back normal training images is kept (never test data). Training runs under bfloat16
autocast by default (2-3x faster on CPU; weights and scoring stay float32).

Defaults, unified on the dev set (lite0, 40 epochs, pixel / image AUROC, fit time on 2 cores):
4 fusion layers, an 8 x 8 local grid and per-channel scaling gave 88.9 / 88.6 in 1645 s, over the
20-minute budget; 2 layers alone 88.5 / 85.3 in 1065 s; 2 layers, one scale and a 16 x 16 local
grid 89.0 / 87.2 in 1072 s (magnetic tile pixel 79.8, screw 98.1); the same with statistics per
cluster (3 clusters found, one per category) 89.4 / 87.5 in 941 s (magnetic tile 80.8, screw
98.1), now the default. 100 epochs reach 90.3 / 89.7 (magnetic tile 82.3, screw 98.3) in 2485 s,
still short of PatchCore's 91.0 and twice the budget.
"""

from __future__ import annotations

import copy
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score
from torch import nn
from tqdm import tqdm

from defectloop.collective import LOCAL, Collective
from defectloop.features import Extracted
from defectloop.models.base import AnomalyModel, Confirmed, split_holdout

log = logging.getLogger(__name__)


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


def image_moments(features: torch.Tensor, idx: list[int], batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and mean square of each listed image's features (N x C each), in batches."""
    mean, sq = [], []
    for i in range(0, len(idx), batch):
        x = features[idx[i:i + batch]].float()
        mean.append(x.mean((2, 3)).cpu())
        sq.append(x.pow(2).mean((2, 3)).cpu())
    return torch.cat(mean), torch.cat(sq)


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
    kind = "crad"
    uses_normal_bank = False

    def __init__(self, config):
        super().__init__(config)
        cfg = config
        grid = self.embedder.grid(cfg.image_size)
        self.head = CRADHead(self.dim, (grid, grid), cfg.crad_local_res, cfg.crad_global_res, cfg.crad_width or None,
                             cfg.crad_expansion, cfg.crad_layers, cfg.crad_global, cfg.crad_refine)

    @torch.no_grad()
    def patch_scores(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.head.normalise(feats)
        return (self.head(x) - x).norm(dim=1)

    def fit_head(self, train: Extracted, fit_idx: list[int], progress: bool = False, comm: Collective = LOCAL,
                 confirmed: Confirmed = (), warm: bool = False) -> dict:
        """Trains on normals only (its memory models normality); confirmed defects go to the bank as-is.

        ``warm``: training continues from the loaded grids, network and input statistics."""
        cfg, head = self.config, self.head
        g = torch.Generator().manual_seed(cfg.seed + comm.rank)
        # model selection on held-back normals of the fit set (calibration keeps its own)
        sel_fit, sel_val = split_holdout([train.samples[i] for i in fit_idx], 0.1, cfg.seed + 1)
        tr_idx = [fit_idx[i] for i in sel_fit]
        val_idx = [fit_idx[i] for i in sel_val]
        if not warm:
            # every worker clusters the same gathered per-image moments, so all agree on the statistics
            moments = comm.all_gather(image_moments(train.features, tr_idx))
            image_mean = torch.cat([m for m, _ in moments])
            head.stats.fit(image_mean, torch.cat([q for _, q in moments]), cfg.crad_clusters, cfg.seed)
            log.info("crad: %d cluster(s) of feature statistics from %d images", head.stats.mean.shape[0],
                     len(image_mean))
        grid_ids = {id(p) for p in head.grids()}
        opt = torch.optim.AdamW([
            {"params": head.grids(), "lr": cfg.crad_grid_lr},
            {"params": [p for p in head.parameters() if id(p) not in grid_ids], "lr": cfg.lr}],
            weight_decay=cfg.crad_weight_decay)
        # every worker takes the same number of steps (DDP averages gradients step by step)
        steps_per_epoch = max(1, min(comm.all_gather(len(tr_idx))) // cfg.crad_batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.crad_epochs * steps_per_epoch)
        model = comm.wrap(head)
        best, best_state, history, bad = float("inf"), None, [], 0
        t0 = time.perf_counter()
        bar = tqdm(range(cfg.crad_epochs), desc="crad head", disable=not progress, leave=False)
        for epoch in bar:
            head.train()
            order = torch.tensor(tr_idx)[torch.randperm(len(tr_idx), generator=g)]
            total = 0.0
            for s in range(steps_per_epoch):
                x = head.normalise(train.features[order[s * cfg.crad_batch_size:(s + 1) * cfg.crad_batch_size]])
                jitter = cfg.crad_jitter if float(torch.rand((), generator=g)) < 0.5 else 0.0
                with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.crad_bf16):
                    x_hat = model(x, jitter)
                loss = F.mse_loss(x_hat.float(), x)
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(head.parameters(), 1.0)
                opt.step()
                sched.step()
                total += loss.item()
            train_loss = comm.all_sum(total / steps_per_epoch) / comm.world
            val_sum, val_n = self._val_loss(train.features[val_idx]) if val_idx else (0.0, 0)
            val_n = comm.all_sum(val_n)
            val = comm.all_sum(val_sum) / val_n if val_n else train_loss
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val})
            bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val:.4f}")
            if val < best:
                best, best_state, bad = val, copy.deepcopy(head.state_dict()), 0
            else:
                bad += 1
                if bad >= cfg.crad_patience:
                    log.info("crad: early stop at epoch %d (best val %.4f)", epoch, best)
                    break
        if best_state is not None:
            head.load_state_dict(best_state)
        head.eval()
        return {"crad_clusters": head.stats.mean.shape[0], "crad_stats_images": 0 if warm else len(image_mean),
                "crad_epochs_run": len(history), "crad_best_val_loss": best, "crad_history": history,
                "crad_train_s": time.perf_counter() - t0}

    @torch.no_grad()
    def _val_loss(self, feats: torch.Tensor, batch: int = 64) -> tuple[float, int]:
        """Summed squared reconstruction error of held-back normals, and the number of values."""
        self.head.eval()
        total = 0.0
        for i in range(0, feats.shape[0], batch):
            x = self.head.normalise(feats[i:i + batch])
            total += F.mse_loss(self.head(x), x, reduction="sum").item()
        return total, feats.numel()

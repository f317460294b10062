"""DMAD: dual memory banks (normal + abnormal) feeding a learned patch scorer.

Implements the method as DESIGN.md section 4 corrects it:

- knowledge enhancement of a patch q: residual and distance to its nearest normal entry, and the
  distance to its nearest abnormal entry (the published softmax-attended abnormal residual was an
  MLP input here until annotators' new masks, unseen in training, were measured to derail it);
- the same enhancement for training and test patches, with leave-one-image-out: a training
  patch never sees bank entries of its own image (else the scorer learns "I am in the bank");
- pseudo-anomalies: noise on normal features, with the enhancement recomputed for the noisy one;
- scorer: feature adaptor + MLP, hinge loss (margin 0.5) over normal, pseudo, synthetic and real
  abnormal patches (real ones weighted up); no normalisation layers, so eval = train behaviour;
  it learns a correction on top of the nearest-normal distance, averaged over a few independently
  trained heads (see DMADScorer);
- cold start: without annotations the abnormal bank holds synthetic defects painted on normal
  training images;
- the abnormal bank is read at scoring time, so a newly confirmed mask changes scores at once.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from defectloop.collective import LOCAL, Collective
from defectloop.data.images import ImageError, load_image
from defectloop.data.synthetic import add_defect
from defectloop.features import Extracted, image_tensor
from defectloop.memory import Provenance, knn
from defectloop.models.base import AnomalyModel, Confirmed
from defectloop.precision import matmul_dtype

log = logging.getLogger(__name__)

#: distance (in units of the typical normal distance) standing for "no abnormal entry to compare"
NO_ABNORMAL = 10.0
MARGIN = 0.5


@dataclass
class Enhanced:
    """Knowledge-enhanced patches: query, normal residual, distances to both banks."""

    q: torch.Tensor  # N x D
    r_n: torch.Tensor  # N x D, q - nearest normal entry
    d_n: torch.Tensor  # N
    d_a: torch.Tensor  # N, distance to nearest abnormal entry

    def take(self, idx: torch.Tensor) -> Enhanced:
        return Enhanced(self.q[idx], self.r_n[idx], self.d_n[idx], self.d_a[idx])

    @staticmethod
    def cat(parts: list[Enhanced]) -> Enhanced:
        return Enhanced(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "r_n", "d_n", "d_a")))


class CorrectionHead(nn.Module):
    """Feature adaptor + MLP: a bounded correction in (-1, 1) from a patch and its normal residual."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.adaptor = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim + 1, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, q: torch.Tensor, r_n: torch.Tensor, log_dn: torch.Tensor) -> torch.Tensor:
        a = self.adaptor
        return torch.tanh(self.mlp(torch.cat([a(q), a(r_n), log_dn[:, None]], 1))[:, 0])


class DMADScorer(nn.Module):
    """Maps an enhanced patch to an anomaly score (positive = anomalous).

    The score is the PatchCore evidence l_n = log(1 + d_n / scale), raised by how much closer the
    patch is to a confirmed defect than to any normal patch, relu(l_n - l_a), plus a learned,
    bounded correction from the patch and its normal residual. So a patch near a confirmed defect
    scores higher the moment that defect enters the abnormal bank, while patches nearer the normal
    bank (most of them) keep PatchCore's ranking. The correction's last layer starts at zero, so
    an untrained scorer ranks by this evidence; the hinge loss then only moves patches that sit on
    the wrong side of the margin (seen defect types pulled up, normal variation pushed down).

    The correction is the mean of several heads, each trained on its own batches from its own
    initial weights. The training data (pseudo-anomalies, synthetic and a few real defects) is
    separated perfectly, so one head is unconstrained where unseen defects fall, and its ranking
    there swings with its seed (measured on the dev set: mean image AUROC 81.9 to 92.0 over
    three seeds, screw 63 to 88); the mean of three heads kept the gains (92.8, screw 90.5).
    """

    def __init__(self, dim: int, hidden: int = 256, heads: int = 3):
        super().__init__()
        self.heads = nn.ModuleList(CorrectionHead(dim, hidden) for _ in range(heads))
        # decision boundary of the hinge loss, learned; starts at d_n = 2 typical distances
        self.threshold = nn.Parameter(torch.tensor(math.log(3.0)))
        # feature statistics and distance scale, set from training data before fitting
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("scale", torch.ones(()))

    def forward(self, e: Enhanced, per_head: bool = False) -> torch.Tensor:
        """Patch scores; ``per_head`` (training) splits the rows evenly among the heads, in order,
        so that each head scores its own batch, instead of averaging the heads over all rows."""
        log_dn, log_da = torch.log1p(e.d_n / self.scale), torch.log1p(e.d_a / self.scale)
        # the correction sees the patch and its normal evidence only: abnormal-bank entries act
        # through relu(l_n - l_a) alone, so annotators' new masks (never seen in training) cannot
        # push the MLP out of its training distribution (measured: confirmed masks from the pool
        # took held-out image AUROC from 87.9 to 77.8 when the MLP also read the abnormal residual)
        q, r_n = (e.q - self.mean) / self.std, e.r_n / self.std
        if per_head:
            n = len(self.heads)
            chunks = zip(self.heads, q.chunk(n), r_n.chunk(n), log_dn.chunk(n), strict=True)
            correction = torch.cat([head(qi, ri, li) for head, qi, ri, li in chunks])
        else:
            correction = self.mean_correction(q, r_n, log_dn)
        return log_dn + F.relu(log_dn - log_da) + correction

    def mean_correction(self, q: torch.Tensor, r_n: torch.Tensor, log_dn: torch.Tensor) -> torch.Tensor:
        """The heads' mean correction, in the matmul type (scoring).

        Each adaptor is linear and feeds only its head's first layer, so it folds into that
        layer's weights: three products per head, on one shared input, written in place (3x
        faster than the modules in float32 on the dev machine, 5x with bfloat16).
        """
        dtype, dim = matmul_dtype(), q.shape[1]
        x = torch.empty(len(q), 2 * dim + 1, dtype=dtype)
        x[:, :dim], x[:, dim:2 * dim], x[:, 2 * dim] = q, r_n, log_dn
        total = torch.zeros(len(q))
        for h in self.heads:
            a, first, second, last = h.adaptor, h.mlp[0], h.mlp[2], h.mlp[4]
            wq, wr, wl = first.weight[:, :dim], first.weight[:, dim:2 * dim], first.weight[:, 2 * dim:]
            w1 = torch.cat([wq @ a.weight, wr @ a.weight, wl], 1)
            b1 = first.bias + (wq + wr) @ a.bias
            hidden = F.leaky_relu(torch.addmm(b1.to(dtype), x, w1.T.to(dtype)), 0.2, inplace=True)
            hidden = F.leaky_relu(torch.addmm(second.bias.to(dtype), hidden, second.weight.T.to(dtype)), 0.2, inplace=True)
            total += torch.tanh(torch.addmm(last.bias.to(dtype), hidden, last.weight.T.to(dtype))[:, 0].float())
        return total / len(self.heads)


def nearest_normal(q: torch.Tensor, bank_feats: torch.Tensor, bank_owner: torch.Tensor,
                   query_owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest normal entry from another image than the query's (exact; used for training).

    A bank made of the query's own image alone leaves nothing else: then its nearest entry.
    """
    d, idx = knn(q, bank_feats, 1, exclude=(query_owner, bank_owner))
    d, idx = d[:, 0], idx[:, 0]
    alone = ~torch.isfinite(d)
    if alone.any():
        d_own, idx_own = knn(q[alone], bank_feats, 1)
        d[alone], idx[alone] = d_own[:, 0], idx_own[:, 0]
    return d, idx


def nearest_abnormal(q: torch.Tensor, feats: torch.Tensor, no_abnormal: float, owner: torch.Tensor,
                     query_owner: torch.Tensor) -> torch.Tensor:
    """Distance to the nearest abnormal entry of another image (``no_abnormal`` when there is none; training)."""
    if feats.shape[0] == 0:
        return torch.full((q.shape[0],), no_abnormal)
    d = knn(q, feats, 1, exclude=(query_owner, owner))[0][:, 0]
    return torch.where(torch.isfinite(d), d, torch.full_like(d, no_abnormal))


def mask_cells(feats: torch.Tensor, coverage: torch.Tensor, threshold: float) -> torch.Tensor:
    """Patch features (C x H x W) whose cell is covered by the mask at least ``threshold`` (area pooling)."""
    c, h, w = feats.shape
    cov = F.adaptive_avg_pool2d(coverage[None, None], (h, w))[0, 0]
    return feats.permute(1, 2, 0)[cov >= threshold]


class DMAD(AnomalyModel):
    kind = "dmad"

    def __init__(self, config):
        super().__init__(config)
        self.scorer = DMADScorer(self.dim, config.hidden, config.heads)

    # ----- enhancement ---------------------------------------------------------------------
    def _no_abnormal(self) -> float:
        return NO_ABNORMAL * float(self.scorer.scale)

    def enhance(self, q: torch.Tensor) -> Enhanced:
        """Enhancement of test patches against the current banks (no exclusions)."""
        bank, abnormal = self.normal_bank, self.abnormal_bank
        d_n, idx = bank.index.search(q)
        d_a = abnormal.index.search(q)[0] if len(abnormal) else torch.full_like(d_n, self._no_abnormal())
        return Enhanced(q, q - bank.features[idx], d_n, d_a)

    @torch.no_grad()
    def patch_scores(self, feats: torch.Tensor) -> torch.Tensor:
        b, c, h, w = feats.shape
        e = self.enhance(feats.permute(0, 2, 3, 1).reshape(-1, c))
        return self.scorer(e).view(b, h, w)

    # ----- training ------------------------------------------------------------------------
    def _synthetic_anomalies(self, train: Extracted, fit_idx: list[int], per_category: int) -> list[tuple[int, torch.Tensor]]:
        """Paint synthetic defects on a few normal training images per category; (image, patches)."""
        per_cat: dict[str, list[int]] = {}
        for i in fit_idx:
            per_cat.setdefault(train.samples[i].category, []).append(i)
        out = []
        rng = np.random.default_rng(self.config.seed)
        for cat, idx in sorted(per_cat.items()):
            random.Random(f"{self.config.seed}/synthetic/{cat}").shuffle(idx)
            for i in idx[:per_category]:
                try:
                    image = load_image(train.samples[i].path)
                except ImageError:
                    continue
                painted, mask = add_defect(image, rng=rng)
                size = self.config.image_size
                f = self.embedder(image_tensor(painted, size)[None])[0]
                cov = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=(size, size),
                                    mode="area")[0, 0]
                cells = mask_cells(f, cov, self.config.mask_coverage)
                if len(cells):
                    out.append((i, cells))
        return out

    def fit_head(self, train: Extracted, fit_idx: list[int], progress: bool = False, comm: Collective = LOCAL,
                 confirmed: Confirmed = (), warm: bool = False) -> dict:
        """Rebuild the abnormal bank and train the scorer (``warm``: from its weights and statistics)."""
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed + comm.rank)
        ids = {s.image_id: i for i, s in enumerate(train.samples)}  # this worker's images; others are -1
        bank = self.normal_bank
        bank_owner = torch.tensor([ids.get(x, -1) for x in bank.image_ids])[bank.owners]

        # abnormal bank: real annotated masks, then synthetic defects (cold start and extra negatives);
        # each worker finds those of its shard, and every worker gets the same bank
        found: list[tuple[Provenance, torch.Tensor]] = []
        real_q, real_owner = [], []
        for i, (s, m) in enumerate(zip(train.samples, train.masks, strict=True)):
            if s.label == 1 and m is not None:
                cells = mask_cells(train.features[i], m, cfg.mask_coverage)
                if len(cells):
                    found.append((Provenance(f"train:{s.image_id}", s.image_id, s.category, s.defect), cells))
                    real_q.append(cells)
                    real_owner.append(torch.full((len(cells),), i))
        syn_q, syn_owner = [], []
        per_category = math.ceil(cfg.synthetic_per_category / comm.world)
        for i, cells in self._synthetic_anomalies(train, fit_idx, per_category):
            s = train.samples[i]
            found.append((Provenance(f"synthetic:{s.image_id}", s.image_id, s.category, "synthetic", "synthetic"), cells))
            syn_q.append(cells)
            syn_owner.append(torch.full((len(cells),), i))
        # annotators' confirmed defects (on pool images, outside the training set): in every worker's
        # bank, and real anomalies to train on, shared out among the workers; each pool image gets
        # an owner of its own so that leave-one-image-out also holds for them
        for prov, _ in confirmed:
            ids.setdefault(prov.image_id, len(train.samples) + len(ids))
        for prov, cells in list(confirmed)[comm.rank::comm.world]:
            real_q.append(cells)
            real_owner.append(torch.full((len(cells),), ids[prov.image_id]))
        self.abnormal_bank = type(self.abnormal_bank)(self.dim)
        for part in comm.all_gather(found):
            for prov, cells in part:
                self.abnormal_bank.add(prov, cells)
        for prov, cells in confirmed:
            self.abnormal_bank.add(prov, cells)
        ab_feats, ab_group, ab_provs = self.abnormal_bank.tensors()
        ab_owner = torch.tensor([ids.get(p.image_id, -1) for p in ab_provs], dtype=torch.long)[ab_group]

        # normal patch pool from the fitted images (this worker's share)
        feats = train.features[fit_idx]
        n_img, c, h, w = feats.shape
        n_pool = min(cfg.train_patches // comm.world, n_img * h * w)
        flat_idx = torch.randperm(n_img * h * w, generator=g)[:n_pool]
        q_n = feats.permute(0, 2, 3, 1).reshape(-1, c)[flat_idx]
        own_n = torch.tensor(fit_idx)[flat_idx // (h * w)]
        near_n = nearest_normal(q_n, bank.features, bank_owner, own_n)
        if not warm:  # feature statistics and distance scale: the same on every worker
            keep = n_pool if comm.world == 1 else 4096
            parts = comm.all_gather((q_n[:keep], near_n[0][:keep]))
            sample, dists = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            self.scorer.mean.copy_(sample.mean(0))
            self.scorer.std.copy_(sample.std(0).clamp_min(1e-6))
            self.scorer.scale.fill_(float(dists.median().clamp_min(1e-6)))

        def enhanced(q: torch.Tensor, owner: torch.Tensor,
                     near: tuple[torch.Tensor, torch.Tensor] | None = None) -> Enhanced:
            d_n, idx = near or nearest_normal(q, bank.features, bank_owner, owner)
            d_a = nearest_abnormal(q, ab_feats, self._no_abnormal(), ab_owner, owner)
            return Enhanced(q, q - bank.features[idx], d_n, d_a)

        e_n = enhanced(q_n, own_n, near_n)  # the scale needed the normal pool's search already
        # pseudo-anomalies: noise along the feature spread, 1-3 typical normal distances long
        noise = torch.randn(q_n.shape, generator=g) * self.scorer.std
        length = self.scorer.scale * (1 + 2 * torch.rand(n_pool, 1, generator=g))
        e_p = enhanced(q_n + noise / noise.norm(dim=1, keepdim=True) * length, own_n)
        e_r = enhanced(torch.cat(real_q), torch.cat(real_owner)) if real_q else None
        e_s = enhanced(torch.cat(syn_q), torch.cat(syn_owner)) if syn_q else None

        scorer = comm.wrap(self.scorer)
        opt = torch.optim.Adam(self.scorer.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
        self.scorer.train()
        bs = max(2, cfg.batch_size // comm.world)
        bar = tqdm(range(cfg.steps), desc="dmad scorer", disable=not progress, leave=False)
        loss_val = float("nan")
        for _ in bar:
            # one forward over [normal | pseudo | real | synthetic] for each head in turn, each with its
            # own batch (DDP wants one forward per backward)
            groups = []
            for _head in self.scorer.heads:
                i = torch.randint(n_pool, (bs,), generator=g)
                groups += [(e_n.take(i), 1.0, -1.0), (e_p.take(i), 1.0, 1.0)]
                for e, weight in ((e_r, cfg.real_weight), (e_s, cfg.synthetic_weight)):
                    if e is not None:
                        groups.append((e.take(torch.randint(len(e.q), (bs // 2,), generator=g)), weight, 1.0))
            out = scorer(Enhanced.cat([e for e, _, _ in groups]), per_head=True)
            t = self.scorer.threshold
            loss, start = out.new_zeros(()), 0
            for e, weight, sign in groups:  # sign -1: should score below the threshold, +1: above
                o = out[start:start + len(e.q)]
                start += len(e.q)
                loss = loss + weight * F.relu(MARGIN - sign * (o - t)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss_val = loss.item()
            bar.set_postfix(loss=f"{loss_val:.3f}")
        self.scorer.eval()
        return {"abnormal_bank_size": len(self.abnormal_bank),
                "real_abnormal_patches": int(comm.all_sum(0 if e_r is None else len(e_r.q))),
                "synthetic_abnormal_patches": int(comm.all_sum(0 if e_s is None else len(e_s.q))),
                "final_loss": comm.all_sum(loss_val) / comm.world}

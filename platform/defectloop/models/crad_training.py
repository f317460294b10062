"""Training the CRAD head on cached frozen features: MSE to the input, normals only.

The epoch with the lowest loss on held-back normal training images is kept (never test data).
Training runs under bfloat16 autocast by default (2-3x faster on CPU; weights and scoring stay
float32). Confirmed defects are not trained on: the continuous memory models normality.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from defectloop.collective import LOCAL, Collective
from defectloop.features import Extracted
from defectloop.models.abnormal_memory import Confirmed
from defectloop.models.crad import CRAD, CRADHead
from defectloop.models.holdout import split_holdout
from defectloop.progress import bar as progress_bar

log = logging.getLogger(__name__)


def image_moments(features: torch.Tensor, idx: list[int], batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and mean square of each listed image's features (N x C each), in batches."""
    mean, sq = [], []
    for i in range(0, len(idx), batch):
        x = features[idx[i:i + batch]].float()
        mean.append(x.mean((2, 3)).cpu())
        sq.append(x.pow(2).mean((2, 3)).cpu())
    return torch.cat(mean), torch.cat(sq)


def train_crad_head(model: CRAD, train: Extracted, fit_idx: list[int], progress: bool = False,
                    comm: Collective = LOCAL, confirmed: Confirmed = (), warm: bool = False,
                    held_idx: Sequence[int] = ()) -> dict:
    """Train on normals only. ``warm``: training continues from the loaded grids, network and input
    statistics. The calibration normals ``held_idx`` stay unseen: model selection holds back its own."""
    cfg, head = model.config.crad, model.head
    g = torch.Generator().manual_seed(model.config.seed + comm.rank)
    # model selection on held-back normals of the fit set (calibration keeps its own)
    sel_fit, sel_val = split_holdout([train.samples[i] for i in fit_idx], 0.1, model.config.seed + 1)
    tr_idx = [fit_idx[i] for i in sel_fit]
    val_idx = [fit_idx[i] for i in sel_val]
    n_stats = 0
    if not warm:
        # every worker clusters the same gathered per-image moments, so all agree on the statistics
        moments = comm.all_gather(image_moments(train.features, tr_idx))
        image_mean = torch.cat([m for m, _ in moments])
        head.stats.fit(image_mean, torch.cat([q for _, q in moments]), cfg.clusters, model.config.seed)
        n_stats = len(image_mean)
        log.info("crad: %d cluster(s) of feature statistics from %d images", head.stats.mean.shape[0], n_stats)
    grid_ids = {id(p) for p in head.grids()}
    opt = torch.optim.AdamW([
        {"params": head.grids(), "lr": cfg.grid_lr},
        {"params": [p for p in head.parameters() if id(p) not in grid_ids], "lr": cfg.lr}],
        weight_decay=cfg.weight_decay)
    # every worker takes the same number of steps (DDP averages gradients step by step)
    steps_per_epoch = max(1, min(comm.all_gather(len(tr_idx))) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
    wrapped = comm.wrap(head)
    best, best_state, history, bad = float("inf"), None, [], 0
    t0 = time.perf_counter()
    bar = progress_bar(range(cfg.epochs), desc="crad head", shown=progress)
    for epoch in bar:
        head.train()
        order = torch.tensor(tr_idx)[torch.randperm(len(tr_idx), generator=g)]
        total = 0.0
        for s in range(steps_per_epoch):
            x = head.normalise(train.features[order[s * cfg.batch_size:(s + 1) * cfg.batch_size]])
            jitter = cfg.jitter if float(torch.rand((), generator=g)) < 0.5 else 0.0
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                x_hat = wrapped(x, jitter)
            loss = F.mse_loss(x_hat.float(), x)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item()
        train_loss = comm.all_sum(total / steps_per_epoch) / comm.world
        val_sum, val_n = val_loss(head, train.features[val_idx]) if val_idx else (0.0, 0)
        val_n = comm.all_sum(val_n)
        val = comm.all_sum(val_sum) / val_n if val_n else train_loss
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val})
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val:.4f}")
        if val < best:
            best, best_state, bad = val, copy.deepcopy(head.state_dict()), 0
        else:
            bad += 1
            if bad >= cfg.patience:
                log.info("crad: early stop at epoch %d (best val %.4f)", epoch, best)
                break
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    return {"crad_clusters": head.stats.mean.shape[0], "crad_stats_images": n_stats,
            "crad_epochs_run": len(history), "crad_best_val_loss": best, "crad_history": history,
            "crad_train_s": time.perf_counter() - t0}


@torch.no_grad()
def val_loss(head: CRADHead, feats: torch.Tensor, batch: int = 64) -> tuple[float, int]:
    """Summed squared reconstruction error of held-back normals, and the number of values."""
    head.eval()
    total = 0.0
    for i in range(0, feats.shape[0], batch):
        x = head.normalise(feats[i:i + batch])
        total += F.mse_loss(head(x), x, reduction="sum").item()
    return total, feats.numel()

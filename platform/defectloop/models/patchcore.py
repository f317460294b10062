"""PatchCore baseline: a patch's anomaly score is its distance to the nearest normal bank entry."""

from __future__ import annotations

import torch

from defectloop.models.base import AnomalyModel


class PatchCore(AnomalyModel):
    """No learned parts and no abnormal memory: the normal bank alone."""

    kind = "patchcore"

    @torch.no_grad()
    def patch_scores(self, feats: torch.Tensor) -> torch.Tensor:
        b, c, h, w = feats.shape
        d, _ = self.normal_bank.index.search(feats.permute(0, 2, 3, 1).reshape(-1, c))
        return d.view(b, h, w)

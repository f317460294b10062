"""PatchCore baseline: a patch's anomaly score is its distance to the nearest normal bank entry."""

from __future__ import annotations

import torch

from defectloop.models.base import AnomalyModel, kept_patches


class PatchCore(AnomalyModel):
    """No learned parts and no abnormal memory: the normal bank alone."""

    kind = "patchcore"

    @torch.no_grad()
    def patch_scores(self, feats: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        q, put = kept_patches(feats, keep)
        return put(self.normal_bank.index.search(q)[0])

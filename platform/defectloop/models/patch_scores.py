"""A pool's patch scores, kept current as the model's memory changes.

A labeling pool is embedded once; re-ranking it after an annotation should cost what the
annotation changed, not the pool. ``refresh`` brings the scores up to date with the model's
memory and says which images moved. This base is for models whose memory does not change within
a version (PatchCore, CRAD): nothing ever moves. DMAD's follows its abnormal bank
(``DMADPatchScores`` in models/dmad.py).
"""

from __future__ import annotations

from typing import Protocol

import torch


class PatchScorer(Protocol):
    """What PatchScores needs of a model (AnomalyModel, which builds it: no import back up)."""

    def patch_scores(self, feats: torch.Tensor) -> torch.Tensor: ...

    def eval(self) -> object: ...


class PatchScores:
    """Patch scores (B x H x W) of fixed patch features under one model."""

    def __init__(self, model: PatchScorer, feats: torch.Tensor, batch_size: int = 64):
        self.model, self.batch_size = model, batch_size
        self.scores = self._score(feats)

    @torch.no_grad()
    def _score(self, feats: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return torch.cat([self.model.patch_scores(feats[i:i + self.batch_size]) for i in range(0, len(feats), self.batch_size)])

    def grow(self, feats: torch.Tensor) -> None:
        """The pool grew: ``feats`` are all its features, those already scored first. Only the new
        images are scored, against the model's memory as it is now."""
        self.scores = torch.cat([self.scores, self._score(feats[len(self.scores):])])

    def of(self, images: torch.Tensor) -> torch.Tensor:
        """Patch scores of the given images (indices)."""
        return self.scores[images]

    def refresh(self) -> torch.Tensor:
        """Indices of the images whose patch scores changed since the last refresh (or creation)."""
        return torch.zeros(0, dtype=torch.long)

    def without(self, image: int, groups: set[str]) -> torch.Tensor:
        """Patch scores (H x W) of one image as if the named memory groups (annotations, normal
        evidence) were not there: here, a memory without groups, its scores."""
        return self.scores[image]

    def defects(self, images: torch.Tensor) -> list[str | None]:
        """Per image, the defect type its most anomalous patch resembles, where the memory knows one."""
        return [None] * len(images)

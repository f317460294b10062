"""The capability of reading an abnormal bank: what annotators confirm changes scores at once.

Only a model that scores with an abnormal bank (DMAD) has this capability; the labeling loop asks
``isinstance(model, AbnormalMemory)`` and talks to it through ``confirm`` and ``forget`` alone, so
it never needs to know how a mask becomes bank entries. PatchCore and CRAD do not have it: a mask
confirmed for them is a label for the ledger and the next retraining, not a bank change.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from defectloop.features import PatchEmbedder, image_tensor, mask_cells, mask_tensor
from defectloop.memory import AbnormalBank, IndexFactory, Provenance
from defectloop.models.config import ModelConfig

#: entries of annotations by people (not training masks, not synthetic defects)
Confirmed = list[tuple[Provenance, torch.Tensor]]


class AbnormalMemory:
    """Mixin for AnomalyModel subclasses: an abnormal bank, and the public face for confirmed labels."""

    config: ModelConfig
    embedder: PatchEmbedder
    dim: int
    index_factory: IndexFactory
    abnormal_bank: AbnormalBank

    def init_abnormal_memory(self) -> None:
        self.abnormal_bank = AbnormalBank(self.dim, self.index_factory)

    @torch.no_grad()
    def confirm(self, provenance: Provenance, image: np.ndarray, mask: np.ndarray) -> int:
        """An annotator's defect mask (H x W bool) on an RGB image: its patches join the abnormal bank.

        Idempotent per ``provenance.annotation_id``: a second call replaces the first's entries.
        Returns the number of entries now held for it (0: the mask covers no patch, nothing held).
        """
        if image.shape[:2] != mask.shape:
            raise ValueError(f"annotation {provenance.annotation_id}: mask size differs from the image "
                             f"({mask.shape} vs {image.shape[:2]})")
        size = self.config.image_size
        feats = self.embedder(image_tensor(image, size)[None])[0].float()
        cells = mask_cells(feats, mask_tensor(mask, size), self.config.dmad.mask_coverage)
        self.abnormal_bank.add(provenance, cells)
        return len(cells)

    def with_abnormal_bank(self, bank: AbnormalBank) -> AbnormalMemory:
        """A twin of this model that reads ``bank``: it shares the backbone, the normal bank and the
        head (nothing is copied or reloaded), so swapping banks costs only the bank itself, and
        requests in flight on this model keep their bank."""
        twin = copy.copy(self)  # a shallow copy: the module's submodules and tensors are shared
        twin.abnormal_bank = bank
        return twin

    def forget(self, annotation_id: str) -> bool:
        """Remove an annotation's entries; returns whether there were any."""
        return self.abnormal_bank.remove(annotation_id)

    def confirmed(self) -> Confirmed:
        """(provenance, features) of the entries people confirmed: what a retraining trains on."""
        feats, group, provs = self.abnormal_bank.tensors()
        return [(p, feats[group == i]) for i, p in enumerate(provs)
                if p.source == "annotation" and not p.annotation_id.startswith("train:")]

    def memory_by_category(self) -> dict[str, dict[str, int]]:
        out = super().memory_by_category()  # type: ignore[misc]
        feats, group, provs = self.abnormal_bank.tensors()
        for i, n in enumerate(torch.bincount(group, minlength=len(provs)).tolist()):
            out.setdefault(provs[i].category or "?", {"normal": 0, "abnormal": 0})["abnormal"] += n
        return out

    def save_memory(self, folder: Path) -> None:
        self.abnormal_bank.save(folder)

    def load_memory(self, folder: Path) -> None:
        self.abnormal_bank = AbnormalBank.load(folder, index=self.index_factory)

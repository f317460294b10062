"""Which score serves each category of a DMAD model: the learned head's, or the banks' alone.

DMAD's score is the banks' evidence (the nearest-normal distance, raised near confirmed defects)
plus a learned correction (models/dmad.py). The correction is trained on synthetic defects and
the few real ones there are; where no real defect checks it, it may rank unseen defects worse
than the plain distance does: on five categories never used in development, unsupervised DMAD
averaged 82.3 image AUROC against PatchCore's 83.1. On the dev set it was the other way round
(93.1 against 92.0), so neither is right everywhere: each category is judged on labeled images
the head never trained on (held-back normals, and labeled defects held back from training),
and the head serves it only where it ranks them better than the banks' score does. A category
without such defects is served by the banks' score, which is PatchCore's ranking until
annotators confirm defects of it: unsupervised DMAD is never below PatchCore by construction.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from defectloop.metrics import auroc

HEAD, BANKS = "head", "banks"


@dataclass(frozen=True)
class Choice:
    """The score serving one category, and the evidence for it."""

    serves: str  # HEAD or BANKS
    why: str
    normals: int = 0
    defects: int = 0
    head_auroc: float | None = None
    banks_auroc: float | None = None
    head_separation: float | None = None  # the defects' mean score above the normals', in standard deviations
    banks_separation: float | None = None


class HeadChoices:
    """The choice per category; a category not named is served by ``default`` (versions saved before
    the choice existed: the head everywhere, as they were served)."""

    def __init__(self, entries: dict[str, Choice] | None = None, default: str = HEAD):
        self.entries = dict(entries or {})
        self.default = default

    def serves_head(self, category: str) -> bool:
        choice = self.entries.get(category)
        return (choice.serves if choice else self.default) == HEAD

    def everywhere(self) -> bool | None:
        """True or False when every category is served alike, else None."""
        kinds = {c.serves for c in self.entries.values()} | {self.default}
        return kinds == {HEAD} if len(kinds) == 1 else None

    def as_dict(self) -> dict:
        return {"default": self.default, "categories": {c: asdict(v) for c, v in sorted(self.entries.items())}}

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_dict(), indent=1))

    @classmethod
    def load(cls, path: Path) -> HeadChoices:
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        return cls({c: Choice(**v) for c, v in data["categories"].items()}, data["default"])

    @classmethod
    def choose(cls, categories: list[str], labels: torch.Tensor, head: torch.Tensor, banks: torch.Tensor
               ) -> HeadChoices:
        """Per category, from image scores of held-back labeled images (1 = defective) under each score.

        The head serves where it ranks them better: a higher image AUROC or, at equal AUROC (a few
        defects often rank first under both), a wider separation of the defects from the normals.
        Ties go to the banks, the score with nothing learned. Categories without both kinds of
        labels are served by the banks."""
        entries = {}
        for cat in sorted(set(categories)):
            idx = torch.tensor([i for i, c in enumerate(categories) if c == cat])
            y = labels[idx]
            n_def, n_norm = int((y == 1).sum()), int((y == 0).sum())
            if not n_def or not n_norm:
                missing = "labeled defects" if not n_def else "held-back normals"
                entries[cat] = Choice(BANKS, f"no {missing} the head did not train on: the banks' score serves",
                                      n_norm, n_def)
                continue
            (a_h, s_h), (a_b, s_b) = (_judge(s[idx], y) for s in (head, banks))
            better = (a_h, s_h) > (a_b, s_b)
            why = (f"{'the head' if better else 'the banks'} ranked {n_def} held-back defects and {n_norm} normals "
                   f"better (image AUROC {a_h:.3f} with the head, {a_b:.3f} without; separation {s_h:.2f} vs {s_b:.2f})")
            entries[cat] = Choice(HEAD if better else BANKS, why, n_norm, n_def, a_h, a_b, s_h, s_b)
        return cls(entries, BANKS)


def _judge(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(image AUROC, separation: the defects' mean score less the normals', in standard deviations of
    all the scores), rounded so that noise-level differences tie. The scale is every image's, not
    the normals' alone, so that it stays finite, and equal under both scores, with one normal."""
    normal, defect = scores[labels == 0], scores[labels == 1]
    sep = float((defect.mean() - normal.mean()) / scores.std().clamp_min(1e-12))
    return round(auroc(scores.numpy(), labels.numpy().astype(np.int64)) or 0.0, 4), round(sep, 2)

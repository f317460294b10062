"""Which score serves each category of a DMAD model: the learned head's, or the banks' alone.

DMAD's score is the banks' evidence (the nearest-normal distance, raised near confirmed defects)
plus a learned correction (models/dmad.py). Trained on synthetic defects alone, the correction
may rank unseen defects worse than the plain distance: on five categories never used in
development, unsupervised DMAD averaged 82.3 image AUROC against PatchCore's 83.1 (on the dev set
93.1 against 92.0). Trained on real masks of a category it helps there (5 masks per class: +8.4
points where masks exist; the demo's loop: 86.5 -> 96.9 after a retraining on confirmed masks).

So, per category, the head serves where it trained on real masks of the category, and the banks'
score elsewhere, unless labeled images the head never trained on (held-back normals, and defects
held back from its training) show that the other ranks them better. The banks' score is
PatchCore's ranking until annotators confirm defects: unsupervised DMAD is never below PatchCore
by construction, and where the head serves it has beaten that score or learned from real masks.
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
    def choose(cls, categories: list[str], labels: torch.Tensor, head: torch.Tensor, banks: torch.Tensor,
               masks: dict[str, int] | None = None) -> HeadChoices:
        """Per category, from image scores of held-back labeled images (1 = defective) under each
        score, and the number of real masks of each category the head trained on (``masks``).

        What the evidence favours before any judging serves unless the held-back labels show the
        other score ranks them better: the head where it trained on real masks of the category,
        the banks' score (nothing learned) elsewhere. Better: a higher image AUROC or, at equal
        AUROC (a few defects often rank first under both), a separation of the defects from the
        normals wider by more than SEPARATION_MARGIN; with one held-back defect, anything less is
        noise."""
        masks = masks or {}
        entries = {}
        for cat in sorted(set(categories) | set(masks)):
            trained = masks.get(cat, 0)
            first, why_first = ((HEAD, f"trained on {trained} real mask(s) of it") if trained else
                                (BANKS, "no real mask of it trained on"))
            idx = torch.tensor([i for i, c in enumerate(categories) if c == cat], dtype=torch.long)
            y = labels[idx]
            n_def, n_norm = int((y == 1).sum()), int((y == 0).sum())
            if not n_def or not n_norm:
                missing = "labeled defect" if not n_def else "held-back normal"
                entries[cat] = Choice(first, f"{why_first}; no {missing} to judge the head on", n_norm, n_def)
                continue
            (a_h, s_h), (a_b, s_b) = (_judge(s[idx], y) for s in (head, banks))
            head_wins, banks_win = _better((a_h, s_h), (a_b, s_b)), _better((a_b, s_b), (a_h, s_h))
            serves = HEAD if head_wins else BANKS if banks_win else first
            verdict = (f"the {'head' if head_wins else 'banks'} ranked them better" if head_wins or banks_win
                       else f"a tie, and {why_first}")
            why = (f"{n_def} held-back defect(s) and {n_norm} normal(s): {verdict} (image AUROC {a_h:.3f} with the "
                   f"head, {a_b:.3f} without; separation {s_h:.2f} vs {s_b:.2f})")
            entries[cat] = Choice(serves, why, n_norm, n_def, a_h, a_b, s_h, s_b)
        return cls(entries, BANKS)


#: a separation must be wider by this share to count as better (at equal image AUROC)
SEPARATION_MARGIN = 0.1


def _better(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether (AUROC, separation) ``a`` ranks the held-back labels better than ``b``."""
    if a[0] != b[0]:
        return a[0] > b[0]
    return a[1] - b[1] > SEPARATION_MARGIN * max(abs(a[1]), abs(b[1]))


def _judge(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(image AUROC, separation: the defects' mean score less the normals', in standard deviations of
    all the scores), rounded so that noise-level differences tie. The scale is every image's, not
    the normals' alone, so that it stays finite, and equal under both scores, with one normal."""
    normal, defect = scores[labels == 0], scores[labels == 1]
    sep = float((defect.mean() - normal.mean()) / scores.std().clamp_min(1e-12))
    return round(auroc(scores.numpy(), labels.numpy().astype(np.int64)) or 0.0, 4), round(sep, 2)

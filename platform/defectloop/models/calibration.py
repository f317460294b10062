"""Per-category decision thresholds, learned from held-back normal images only (never test data)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

#: the key of the thresholds used for images of a category the model has not seen
ANY_CATEGORY = "*"

Decision = Literal["normal", "anomalous", "unknown"]

#: below this many held-back normal images, a category's own quantile is not trusted alone
MIN_CALIBRATION = 10

#: confirmed masks a category needs before they set its mask edge (Calibration.with_mask_levels)
MIN_MASKS = 3
#: the mask edges tried: the share of an image's rise above the normal level where its mask starts
MASK_LEVELS = tuple(i / 20 for i in range(20))


@dataclass(frozen=True)
class Threshold:
    """One category's calibration: where scores and map values turn anomalous, and the normal spread."""

    threshold: float  # on the image score
    pixel_threshold: float  # on the smoothed anomaly map: cuts it into the predicted defect mask
    normal_mean: float
    normal_std: float
    n: int  # held-back normal images it was set from
    method: str = "quantile"  # or "robust": too few images for a quantile (see Calibration.fit)
    labels: int = 0  # confirmed pool images (normals and defects) that set it (see Calibration.from_labels)
    fitted: float | None = None  # the fitted threshold, where labels moved it
    mask_level: float | None = None  # where confirmed masks put the mask's edge (see mask_cut); None: pixel_threshold
    # confirmed masks that set mask_level; not compared: a mask that leaves the level where it was
    # changes no prediction, so it must not make the loop re-push its category
    mask_labels: int = field(default=0, compare=False)

    def as_fitted(self) -> Threshold:
        """This entry before labels moved its image threshold (the mask level stays)."""
        return self if self.fitted is None else replace(self, threshold=self.fitted, labels=0, fitted=None)

    def mask_cut(self, peak: float) -> float:
        """Where the anomaly map of an image whose map peaks at ``peak`` is cut into its mask.

        As fitted, at ``pixel_threshold``: a normal image's map stays under it as often as a normal
        image is called normal. That says where defects start, not where a defect ends: the edge of
        a defect's blob above it depends on how strong the defect is (measured on the dev set, the
        masks came out half the size of the confirmed ones; on unseen categories ten times). Where
        confirmed masks set ``mask_level``, the mask is where the map rises above the category's
        normal level (``normal_mean``) by that share of the image's own rise: a relative edge that
        fits a faint defect and a strong one alike."""
        if self.mask_level is None:
            return self.pixel_threshold
        return self.normal_mean + self.mask_level * max(0.0, peak - self.normal_mean)


class Calibration:
    """Thresholds per category, with the all-category one (``*``) for categories never seen.

    ``threshold`` decides on the image score; ``pixel_threshold`` cuts the smoothed anomaly map
    into a predicted defect mask, set by the same rule on the maps' peaks so that a normal image
    shows an (empty) mask as often as it is called anomalous.
    """

    def __init__(self, entries: dict[str, Threshold] | None = None):
        self.entries: dict[str, Threshold] = dict(entries or {})

    @classmethod
    def fit(cls, categories: Sequence[str], scores: torch.Tensor, map_peaks: torch.Tensor,
            quantile: float) -> Calibration:
        """The ``quantile`` of held-back normal scores (and map peaks) per category and over all.

        A quantile of a handful of images is the highest of them: a category calibrated on one
        held-back image flooded the labeling queue with false alarms (51 of its 63 open normal
        images called anomalous). Below MIN_CALIBRATION images a category gets the "robust" rule:
        the mean plus the normal quantile's z times the spread, widened for the small sample
        (sqrt(1 + 1/n), a prediction interval), where the spread is never below the spread of
        normal scores within the other categories (pooled); its own quantile stays a floor.
        """
        groups: dict[str, list[int]] = {ANY_CATEGORY: list(range(len(categories)))}
        for i, cat in enumerate(categories):
            groups.setdefault(cat, []).append(i)
        per_cat = [idx for cat, idx in groups.items() if cat != ANY_CATEGORY]
        z = float(torch.special.ndtri(torch.tensor(quantile)))
        entries = {}
        for cat, idx in groups.items():
            v, pk = scores[idx].float(), map_peaks[idx].float()
            std = float(v.std()) if len(v) > 1 else 0.0
            image_t, pixel_t = float(v.quantile(quantile)), float(pk.quantile(quantile))
            method = "quantile"
            if len(idx) < MIN_CALIBRATION:
                method, widen = "robust", z * math.sqrt(1 + 1 / len(idx))
                image_t = max(image_t, _robust(v, scores, per_cat, widen))
                pixel_t = max(pixel_t, _robust(pk, map_peaks, per_cat, widen))
            entries[cat] = Threshold(image_t, pixel_t, float(v.mean()), std, len(v), method)
        return cls(entries)

    def from_labels(self, categories: Sequence[str], scores: torch.Tensor, anomalous: torch.Tensor,
                    quantile: float) -> Calibration:
        """These (fitted) thresholds, moved by the pool images annotators confirmed.

        The fitted thresholds come from normal training images held back; the pool is what they are
        applied to, and it may not look like the training images (new lighting, a new batch). Per
        category, on the confirmed images' scores (``anomalous``: True for a confirmed defect, mask
        or verdict; False for a normal):
        - normals and defects: the cut that misclassifies the fewest of them, in the middle of the
          widest gap between neighbouring scores (a one-dimensional maximum margin: where they are
          separated, halfway between the highest normal and the lowest defect). Confirmed defects
          are the ones the model ranks highest, so a threshold right under the lowest of them would
          hide the fainter ones nobody has labeled yet; one right over the highest normal would
          flag their look-alikes;
        - normals only: raised to the ``quantile`` of their scores (the highest while there are
          fewer than 1 / (1 - quantile)): every confirmed normal the model calls anomalous is a
          false alarm seen; never lowered (nothing says the fitted one is too high);
        - defects only: as fitted (nothing says where normals end).
        Below MIN_CALIBRATION confirmed normals, labels only raise a threshold: a handful of normals
        says little about the tail of the unlabeled ones, and a threshold lowered on them floods the
        queue with false alarms (what ``fit`` guards against too). Only the decision moves: the
        normalised scores stay on the fitted threshold (``normalise``), so that a move rewrites the
        predictions it flips, not every prediction of the category. Categories without thresholds
        of their own are left to the all-category ones.
        """
        entries = dict(self.entries)
        for cat in sorted(set(categories)):
            entry = self.entries.get(cat)
            if entry is None or cat == ANY_CATEGORY:
                continue
            idx = torch.tensor([i for i, c in enumerate(categories) if c == cat])
            bad = anomalous[idx]
            normal, defects = scores[idx][~bad].float(), scores[idx][bad].float()
            if not len(normal):
                continue
            if not len(defects):
                moved = max(float(normal.quantile(quantile, interpolation="higher")), entry.threshold)
            elif len(normal) < MIN_CALIBRATION:
                moved = max(_widest_cut(normal, defects), entry.threshold)
            else:
                moved = _widest_cut(normal, defects)
            if moved != entry.threshold:
                entries[cat] = replace(entry, threshold=moved, labels=len(idx), fitted=entry.threshold)
        return Calibration(entries)

    def with_mask_levels(self, categories: Sequence[str], maps: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                         min_masks: int = MIN_MASKS) -> Calibration:
        """These thresholds with each category's mask edge (``Threshold.mask_cut``) set by its
        confirmed masks: ``maps`` (H x W each, scored without the memory its own mask added, as a
        look-alike nobody labeled would be; one size per category) and ``masks`` (bool, at each
        map's size).

        Per category with ``min_masks`` or more, the level of ``MASK_LEVELS`` whose masks have the
        highest mean IoU with the confirmed ones, where it beats the fitted cut on them (a tie keeps
        the fitted cut). A category with fewer masks keeps (or gets back) its fitted cut. Few masks
        choose a noisy level, yet on the dev set even three did better on the defects they had not
        seen than the fitted cut, on average over draws (docs/models.md); a leave-one-out gate
        against it rejected more gains than losses and was dropped.
        """
        entries = dict(self.entries)
        for cat, entry in self.entries.items():
            idx = [i for i, c in enumerate(categories) if c == cat]
            fitted = replace(entry, mask_level=None, mask_labels=0)
            entries[cat] = fitted
            if len(idx) < min_masks or cat == ANY_CATEGORY:
                continue
            m, truth = torch.stack([maps[i] for i in idx]).float(), torch.stack([masks[i] for i in idx]).bool()
            ious = torch.stack([_mask_ious(replace(fitted, mask_level=level), m, truth).mean() for level in MASK_LEVELS])
            if ious.max() > _mask_ious(fitted, m, truth).mean():
                entries[cat] = replace(fitted, mask_level=MASK_LEVELS[int(ious.argmax())], mask_labels=len(idx))
        return Calibration(entries)

    def methods(self) -> dict[str, str]:
        """How each category's thresholds were set: "quantile" or "robust" (too few images),
        "+labels" where confirmed pool images moved them, "+masks" where confirmed masks set the
        mask edge."""
        return {c: e.method + ("+labels" if e.labels else "") + ("+masks" if e.mask_level is not None else "")
                for c, e in self.entries.items()}

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Calibration) and self.entries == other.entries

    def categories(self) -> list[str]:
        """The categories with thresholds of their own."""
        return sorted(c for c in self.entries if c != ANY_CATEGORY)

    def knows(self, category: str | None) -> bool:
        return category is not None and category in self.entries and category != ANY_CATEGORY

    def get(self, category: str | None) -> Threshold | None:
        """The category's thresholds, or the all-category ones for an unseen or unnamed category."""
        return self.entries.get(category or ANY_CATEGORY) or self.entries.get(ANY_CATEGORY)

    def threshold(self, category: str | None = None) -> float | None:
        entry = self.get(category)
        return entry.threshold if entry else None

    def pixel_threshold(self, category: str | None = None, peak: float | None = None) -> float | None:
        """Where the map of an image of this category is cut into its mask; with the map's ``peak``,
        where a mask level is set (``Threshold.mask_cut``)."""
        entry = self.get(category)
        if entry is None:
            return None
        return entry.pixel_threshold if peak is None else entry.mask_cut(peak)

    def decide(self, score: float, category: str | None = None) -> Decision:
        """The one place a score meets its threshold."""
        t = self.threshold(category)
        return "unknown" if t is None else ("anomalous" if score > t else "normal")

    def normalise(self, score: float, category: str | None = None) -> float:
        """Score in (0, 1) with the category's fitted threshold at 0.5, in units of the normal-score spread.

        Comparable across categories, which raw scores are not: what a labeling queue sorts by. The
        squash is x / (1 + |x|), not a logistic: a defect is often tens of spreads above its
        threshold, where a logistic shows every one of them as 1.000 (the ranked tab read "1, 1, 1");
        this one reaches 0.999 only 500 spreads out, so the order stays readable.
        """
        entry = self.get(category)
        if not entry:
            return float(score)
        t = entry.as_fitted().threshold
        x = (score - t) / max(entry.normal_std, 0.1 * abs(t), 1e-6)
        return float(0.5 + 0.5 * x / (1.0 + abs(x)))

    def shifted(self, by: float) -> Calibration:
        """Every threshold moved by ``by`` (tests and what-if checks)."""
        return Calibration({c: replace(e, threshold=e.threshold + by) for c, e in self.entries.items()})

    # ----- persistence ---------------------------------------------------------------------
    def save(self, path: Path) -> None:
        path.write_text(json.dumps({c: asdict(e) for c, e in self.entries.items()}, indent=1))

    @classmethod
    def load(cls, path: Path) -> Calibration:
        return cls.loads(path.read_text())

    @classmethod
    def loads(cls, text: str) -> Calibration:
        raw = json.loads(text)
        # versions calibrated before the pixel threshold existed cut maps at the image threshold;
        # before labels could lower a threshold, confirmed normals raised it ("confirmed", "raised_from")
        old = {"confirmed": "labels", "raised_from": "fitted"}
        return cls({c: Threshold(**{"pixel_threshold": e["threshold"], **{old.get(k, k): v for k, v in e.items()}})
                    for c, e in raw.items()})


def _mask_ious(entry: Threshold, maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """IoU of each mask ``entry`` cuts from ``maps`` with ``masks`` (N x H x W each): N values."""
    cut = torch.tensor([entry.mask_cut(float(p)) for p in maps.flatten(1).max(1).values])[:, None, None]
    shown = maps > cut
    return (shown & masks).flatten(1).sum(1) / (shown | masks).flatten(1).sum(1).clamp_min(1)


def _widest_cut(normal: torch.Tensor, defects: torch.Tensor) -> float:
    """The score cut that misclassifies the fewest labeled images (normals above it, defects at or
    below it), halfway across the widest gap between neighbouring scores among those cuts."""
    values = torch.cat([normal, defects]).unique()  # sorted
    if len(values) == 1:  # every label at one score: nothing separates them
        return float(values[0])
    cuts, gaps = (values[1:] + values[:-1]) / 2, values[1:] - values[:-1]
    errors = (normal[None] > cuts[:, None]).sum(1) + (defects[None] <= cuts[:, None]).sum(1)
    fewest = errors == errors.min()
    return float(cuts[fewest][gaps[fewest].argmax()])


def _robust(v: torch.Tensor, values: torch.Tensor, groups: list[list[int]], widen: float) -> float:
    """mean + widen x spread of ``v``, the spread never below the pooled within-group spread of ``values``."""
    own = float(v.std()) if len(v) > 1 else 0.0
    return float(v.mean()) + widen * max(own, _pooled_std(values, groups, 0.1 * abs(float(v.mean()))))


def _pooled_std(values: torch.Tensor, groups: list[list[int]], fallback: float) -> float:
    """The within-group standard deviation pooled over groups of two or more (``fallback``: none)."""
    dof = sum(len(g) - 1 for g in groups if len(g) > 1)
    if not dof:
        return fallback
    return math.sqrt(sum(float(values[g].float().var()) * (len(g) - 1) for g in groups if len(g) > 1) / dof)

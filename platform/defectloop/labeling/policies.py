"""Selection policies: which unlabeled images annotators see next.

Every policy ranks candidates (a task, its normalised anomaly score with the calibrated threshold
at 0.5, optionally an image embedding) and returns the next ``k``; it may learn from the tasks
already labeled (``Labeled``: their category, score now and verdict). ``random`` is the baseline the
others are measured against. How the order reaches Label Studio is :func:`rank_scores`: the
prediction score of the selected tasks is set so that a Data Manager tab sorted by prediction
score (descending) shows them in policy order.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from defectloop.memory.coreset import farthest_points


@dataclass(frozen=True)
class Candidate:
    task_id: int
    score: float  # normalised anomaly score: > 0.5 above the category threshold
    embedding: np.ndarray | None = None  # e.g. the mean patch feature of the image
    category: str = ""


@dataclass(frozen=True)
class Labeled:
    """A task annotators labeled: what a policy learns its categories' yield from."""

    category: str
    score: float  # its normalised score under the current model
    defective: bool


class SelectionPolicy(Protocol):
    name: str

    def select(self, candidates: Sequence[Candidate], k: int, labeled: Sequence[Labeled] = ()) -> list[int]:
        """Task ids of the next ``k`` images to show, best first."""
        ...


class HighestScore:
    """The most anomalous first: finds defects fastest while they are rare."""

    name = "top"

    def select(self, candidates: Sequence[Candidate], k: int, labeled: Sequence[Labeled] = ()) -> list[int]:
        return [c.task_id for c in sorted(candidates, key=lambda c: (-c.score, c.task_id))[:k]]


class PerCategory:
    """The most anomalous of every category in turn: each turn takes the next-best image of each
    category, the higher-scoring first.

    One threshold per category does not make categories equally easy: on the dev demo the top
    policy showed 60 images, none of screw (21 of the pool's 104 defects, and the model's weakest
    category), because screw's defects score lower against its threshold than the other
    categories' do. A category the model is worst at is the one whose labels it needs most.
    """

    name = "per-category"

    def select(self, candidates: Sequence[Candidate], k: int, labeled: Sequence[Labeled] = ()) -> list[int]:
        turns: Counter[str] = Counter()  # an image's turn: its rank within its category
        keyed = []
        for c in sorted(candidates, key=lambda c: (-c.score, c.task_id)):
            keyed.append((turns[c.category], -c.score, c.task_id))
            turns[c.category] += 1
        return [task for _, _, task in sorted(keyed)[:k]]


class Borderline:
    """Closest to the calibrated threshold first: where the model is least sure."""

    name = "borderline"

    def select(self, candidates: Sequence[Candidate], k: int, labeled: Sequence[Labeled] = ()) -> list[int]:
        return [c.task_id for c in sorted(candidates, key=lambda c: (abs(c.score - 0.5), c.task_id))[:k]]


class Diverse:
    """Among the ``pool_factor * k`` most anomalous, a k-center spread over image embeddings
    (starting from the top one), so a batch does not show ten copies of one defect."""

    name = "diverse"

    def __init__(self, pool_factor: int = 4):
        self.pool_factor = pool_factor

    def select(self, candidates: Sequence[Candidate], k: int, labeled: Sequence[Labeled] = ()) -> list[int]:
        top = sorted(candidates, key=lambda c: (-c.score, c.task_id))[: self.pool_factor * k]
        if len(top) <= k or any(c.embedding is None for c in top):
            return [c.task_id for c in top[:k]]
        x = torch.from_numpy(np.stack([c.embedding for c in top]).astype(np.float32))
        picked = farthest_points(x, k, first=0).tolist()
        return [top[i].task_id for i in sorted(picked, key=lambda i: (-top[i].score, top[i].task_id))]


def log_spreads(score: float) -> float:
    """A normalised score -> log(1 + spreads) above its category's threshold, signed: the squash of
    ``Calibration.normalise`` undone, then log-compressed (a defect can be 500 spreads out)."""
    y = min(max(2.0 * score - 1.0, -1 + 1e-9), 1 - 1e-9)
    return math.copysign(math.log1p(abs(y) / (1.0 - abs(y))), y)


class CategoryOdds:
    """P(defective | score) per category, learned from its labels: a logistic in ``log_spreads``.

    One threshold per category does not make a score mean the same everywhere: where the model is
    near chance, images above the threshold are mostly normal. Each category's (slope, offset) is
    the MAP fit to its labels under a prior shared by all: ``slope`` per log spread, and odds of
    e^``offset`` at the threshold (defects are rare and the threshold sits at the top of the normal
    scores: an image just at it is more likely normal; 4 spreads above, 0.9). With no labels every
    category reads its scores alike, with a few the category's own yield takes over. Newton steps
    on two parameters (convex), no library needed.
    """

    def __init__(self, slope: float = 2.0, offset: float = -1.0, slope_sd: float = 1.0, offset_sd: float = 1.5):
        self.prior = np.array([slope, offset])
        self.precision = np.diag([1 / slope_sd**2, 1 / offset_sd**2])

    def fit(self, labeled: Sequence[Labeled]) -> dict[str, np.ndarray]:
        """Per category with labels, its (slope, offset)."""
        by_cat: dict[str, list[Labeled]] = defaultdict(list)
        for lab in labeled:
            by_cat[lab.category].append(lab)
        return {cat: self._map(np.array([log_spreads(x.score) for x in labs]), np.array([float(x.defective) for x in labs]))
                for cat, labs in by_cat.items()}

    def _map(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        x = np.stack([z, np.ones_like(z)], 1)

        def loss(w: np.ndarray) -> float:
            t = x @ w
            return float(np.logaddexp(0, t).sum() - y @ t + 0.5 * (w - self.prior) @ self.precision @ (w - self.prior))

        w = self.prior.copy()
        for _ in range(50):  # Newton with step halving: a full step overshoots where labels saturate
            p = 1 / (1 + np.exp(-np.clip(x @ w, -30, 30)))
            grad = x.T @ (p - y) + self.precision @ (w - self.prior)
            step = np.linalg.solve((x * (p * (1 - p))[:, None]).T @ x + self.precision, grad)
            before = loss(w)
            while loss(w - step) > before and np.abs(step).max() > 1e-12:
                step = step / 2
            w = w - step
            if np.abs(step).max() < 1e-9:
                break
        w[0] = max(w[0], 0.25 * self.prior[0])  # labels of one kind say nothing of the slope: the order stays the score's
        return w

    def odds(self, fitted: dict[str, np.ndarray], category: str, score: float) -> float:
        slope, offset = fitted.get(category, self.prior)
        return 1 / (1 + math.exp(-min(max(slope * log_spreads(score) + offset, -30), 30)))


class Adaptive:
    """Picks follow the yield: each category's candidates in turn, as ``per-category`` does, but a
    category's turns come as often as its candidates are likely defects by what its labels say its
    scores are worth (``CategoryOdds``): the j-th best of a category comes due at (j + 1) / odds.
    With no labels that is ``per-category``, except that candidates under their threshold wait (a
    category near chance has few far above it); a category whose top picks keep coming back normal
    gets fewer turns and the budget moves to where the defects are. Of each batch, besides:

    - ``explore`` (at least one pick, with two categories or more): the best candidate of the
      categories least seen (fewest labels and picks so far), so none is written off on its first
      scores: where the model is weakest its labels are worth the most;
    - ``borderline``, once a category has labels of both kinds (its threshold moves with them):
      the candidates whose odds are nearest even, where a label moves the threshold most.

    A near-duplicate of an image already picked (an embedding closer than ``duplicate`` x the
    category's median distance between its top candidates) is passed over.
    """

    name = "adaptive"

    def __init__(self, explore: float = 0.1, borderline: float = 0.1, duplicate: float = 0.1,
                 odds: CategoryOdds | None = None):
        self.explore, self.borderline, self.duplicate = explore, borderline, duplicate
        self.category_odds = odds or CategoryOdds()

    def select(self, candidates: Sequence[Candidate], k: int, labeled: Sequence[Labeled] = ()) -> list[int]:
        fitted = self.category_odds.fit(labeled)
        odds = {c.task_id: self.category_odds.odds(fitted, c.category, c.score) for c in candidates}
        turn: Counter[str] = Counter()
        due = {}
        for c in sorted(candidates, key=lambda c: (-c.score, c.task_id)):
            turn[c.category] += 1
            due[c.task_id] = turn[c.category] / max(odds[c.task_id], 1e-9)
        ranked = sorted(candidates, key=lambda c: (due[c.task_id], -c.score, c.task_id))
        picks = _Picks(ranked, self.duplicate)
        by_category: dict[str, list[Candidate]] = defaultdict(list)
        for c in ranked:
            by_category[c.category].append(c)
        kinds: dict[str, set[bool]] = defaultdict(set)
        for lab in labeled:
            kinds[lab.category].add(lab.defective)
        both = {cat for cat, seen_kinds in kinds.items() if len(seen_kinds) == 2}
        n_explore = max(1, round(self.explore * k)) if len(by_category) > 1 else 0
        n_border = round(self.borderline * k) if both else 0
        picks.take(ranked, max(0, k - n_explore - n_border))
        seen = Counter(lab.category for lab in labeled)
        for _ in range(n_explore):  # the least-seen category that still has an open candidate
            for cat in sorted(by_category, key=lambda cat: (seen[cat] + picks.per_category[cat], cat)):
                if picks.take(by_category[cat], 1):
                    break
        near_even = sorted((c for c in ranked if c.category in both), key=lambda c: (abs(odds[c.task_id] - 0.5), c.task_id))
        picks.take(near_even, n_border)
        picks.take(ranked, k - len(picks.order))  # what a share could not fill
        return picks.order + [c.task_id for c in ranked if c.task_id not in picks.taken][:k - len(picks.order)]


class _Picks:
    """A batch being filled: in order, per category, and without near-duplicates (``Adaptive``)."""

    def __init__(self, ranked: Sequence[Candidate], duplicate: float):
        self.order: list[int] = []
        self.per_category: Counter[str] = Counter()
        self.taken: set[int] = set()
        self.picked: dict[str, list[np.ndarray]] = defaultdict(list)
        self.radius: dict[str, float] = {}
        if duplicate > 0 and ranked and all(c.embedding is not None for c in ranked):
            by_cat: dict[str, list[np.ndarray]] = defaultdict(list)
            for c in ranked:
                if len(by_cat[c.category]) < 64:
                    by_cat[c.category].append(c.embedding)
            for cat, embs in by_cat.items():
                x = torch.from_numpy(np.stack(embs).astype(np.float32))
                d = torch.cdist(x, x)[torch.triu_indices(len(x), len(x), 1).unbind()]
                self.radius[cat] = duplicate * float(d.median()) if len(d) else 0.0

    def open(self, c: Candidate) -> bool:
        """Neither picked nor a near-duplicate of a pick."""
        if c.task_id in self.taken:
            return False
        r = self.radius.get(c.category, 0.0)
        return not (r > 0 and any(float(np.linalg.norm(c.embedding - e)) < r for e in self.picked[c.category]))

    def take(self, ranked: Sequence[Candidate], n: int) -> int:
        """The first ``n`` open candidates of ``ranked``; how many there were."""
        taken = 0
        for c in ranked:
            if taken == n:
                break
            if self.open(c):
                self.order.append(c.task_id)
                self.taken.add(c.task_id)
                self.per_category[c.category] += 1
                if c.embedding is not None:
                    self.picked[c.category].append(c.embedding)
                taken += 1
        return taken


class RandomPolicy:
    """Uniformly at random (seeded): the baseline."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def select(self, candidates: Sequence[Candidate], k: int, labeled: Sequence[Labeled] = ()) -> list[int]:
        return [c.task_id for c in self.rng.sample(list(candidates), min(k, len(candidates)))]


POLICIES = {"adaptive": Adaptive, "top": HighestScore, "per-category": PerCategory, "borderline": Borderline,
            "diverse": Diverse, "random": RandomPolicy}


def make_policy(name: str, seed: int = 0) -> SelectionPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown selection policy {name!r}; choose one of {', '.join(POLICIES)}")
    return RandomPolicy(seed) if name == "random" else POLICIES[name]()


def rank_scores(order: Sequence[int]) -> dict[int, float]:
    """Prediction scores in (0.5, 1] that sort the selected tasks in policy order (first = 1.0); the
    others are pushed below 0.5 (``PoolPredictor.predictions``)."""
    n = len(order)
    return {task: 1.0 - 0.5 * i / max(n, 1) for i, task in enumerate(order)}

"""Selection policies: which unlabeled images annotators see next.

Every policy ranks candidates (a task, its normalised anomaly score with the calibrated threshold
at 0.5, optionally an image embedding) and returns the next ``k``. ``random`` is the baseline the
others are measured against. How the order reaches Label Studio is :func:`rank_scores`: the
prediction score of the selected tasks is set so that a Data Manager tab sorted by prediction
score (descending) shows them in policy order.
"""

from __future__ import annotations

import random
from collections import Counter
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


class SelectionPolicy(Protocol):
    name: str

    def select(self, candidates: Sequence[Candidate], k: int) -> list[int]:
        """Task ids of the next ``k`` images to show, best first."""
        ...


class HighestScore:
    """The most anomalous first: finds defects fastest while they are rare."""

    name = "top"

    def select(self, candidates: Sequence[Candidate], k: int) -> list[int]:
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

    def select(self, candidates: Sequence[Candidate], k: int) -> list[int]:
        turns: Counter[str] = Counter()  # an image's turn: its rank within its category
        keyed = []
        for c in sorted(candidates, key=lambda c: (-c.score, c.task_id)):
            keyed.append((turns[c.category], -c.score, c.task_id))
            turns[c.category] += 1
        return [task for _, _, task in sorted(keyed)[:k]]


class Borderline:
    """Closest to the calibrated threshold first: where the model is least sure."""

    name = "borderline"

    def select(self, candidates: Sequence[Candidate], k: int) -> list[int]:
        return [c.task_id for c in sorted(candidates, key=lambda c: (abs(c.score - 0.5), c.task_id))[:k]]


class Diverse:
    """Among the ``pool_factor * k`` most anomalous, a k-center spread over image embeddings
    (starting from the top one), so a batch does not show ten copies of one defect."""

    name = "diverse"

    def __init__(self, pool_factor: int = 4):
        self.pool_factor = pool_factor

    def select(self, candidates: Sequence[Candidate], k: int) -> list[int]:
        top = sorted(candidates, key=lambda c: (-c.score, c.task_id))[: self.pool_factor * k]
        if len(top) <= k or any(c.embedding is None for c in top):
            return [c.task_id for c in top[:k]]
        x = torch.from_numpy(np.stack([c.embedding for c in top]).astype(np.float32))
        picked = farthest_points(x, k, first=0).tolist()
        return [top[i].task_id for i in sorted(picked, key=lambda i: (-top[i].score, top[i].task_id))]


class RandomPolicy:
    """Uniformly at random (seeded): the baseline."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def select(self, candidates: Sequence[Candidate], k: int) -> list[int]:
        return [c.task_id for c in self.rng.sample(list(candidates), min(k, len(candidates)))]


POLICIES = {"top": HighestScore, "per-category": PerCategory, "borderline": Borderline, "diverse": Diverse, "random": RandomPolicy}


def make_policy(name: str, seed: int = 0) -> SelectionPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown selection policy {name!r}; choose one of {', '.join(POLICIES)}")
    return RandomPolicy(seed) if name == "random" else POLICIES[name]()


def rank_scores(order: Sequence[int]) -> dict[int, float]:
    """Prediction scores in (0.5, 1] that sort the selected tasks in policy order (first = 1.0); the
    others are pushed below 0.5 (``PoolPredictor.predictions``)."""
    n = len(order)
    return {task: 1.0 - 0.5 * i / max(n, 1) for i, task in enumerate(order)}

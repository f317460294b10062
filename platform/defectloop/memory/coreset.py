"""Coreset samplers: choose the patch features that become the normal memory bank.

:class:`KCenterGreedy` is PatchCore's greedy k-center (farthest-point) selection on a random
projection, made fast for a million patches: every selected centre owns a Voronoi cell of the
points it covers, and a new centre ``c`` can only take points from cells whose owner ``s``
satisfies ``d(c, s) < 2 * radius(s)`` (triangle inequality). Points of all other cells are never
touched, so late iterations cost a few cells instead of a pass over all N points, and the
selection is the same as the plain algorithm's.
"""

from __future__ import annotations

import itertools
import math
from typing import Protocol

import torch


class CoresetSampler(Protocol):
    """Strategy: pick ``n`` row indices of ``features`` (N x D) to keep."""

    def select(self, features: torch.Tensor, n: int) -> torch.Tensor: ...


def target_size(n_total: int, ratio: float, max_size: int | None = None) -> int:
    """Bank size for a ratio (at least 1 entry, at most ``max_size``)."""
    n = max(1, math.ceil(n_total * ratio))
    return min(n, max_size) if max_size else n


class RandomSampler:
    """Uniform random subset: the baseline a coreset must beat."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def select(self, features: torch.Tensor, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return torch.randperm(features.shape[0], generator=g)[: min(n, features.shape[0])]


def random_projection(features: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Johnson-Lindenstrauss projection to ``dim`` columns (identity when already that small)."""
    if features.shape[1] <= dim:
        return features.float()
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(features.shape[1], dim, generator=g) / math.sqrt(dim)
    out = torch.empty(features.shape[0], dim)
    for i in range(0, features.shape[0], 262144):
        out[i:i + 262144] = features[i:i + 262144].float() @ proj
    return out


class KCenterGreedy:
    """Greedy k-center coreset with Voronoi-cell pruning (exact farthest-point order).

    Above ``shard_size`` patches the features are cut into contiguous shards (whole images, as
    they arrive) and each shard selects its share at the same ratio: the cost falls from
    n * N to n * shard_size, which is what makes a million patches take seconds, and it is the
    same composition a distributed build uses (each worker selects from its own shard).

    Args:
        projection_dim: distances are computed after a random projection to this many dims.
        seed: chooses the projection and the first centre.
        shard_size: largest number of patches one k-center run sees.
    """

    def __init__(self, projection_dim: int = 128, seed: int = 0, shard_size: int = 65536):
        self.projection_dim = projection_dim
        self.seed = seed
        self.shard_size = shard_size

    def select(self, features: torch.Tensor, n: int) -> torch.Tensor:
        x = random_projection(features, self.projection_dim, self.seed)
        shards = shard_bounds(x.shape[0], self.shard_size)
        if len(shards) == 1:
            return farthest_points(x, n, self.seed)
        return torch.cat([lo + farthest_points(x[lo:hi], max(1, round(n * (hi - lo) / x.shape[0])), self.seed + i)
                          for i, (lo, hi) in enumerate(shards)])


def shard_bounds(total: int, shard_size: int) -> list[tuple[int, int]]:
    """(start, end) of the fewest equal contiguous shards of at most ``shard_size`` rows."""
    shards = max(1, math.ceil(total / shard_size))
    bounds = [round(total * i / shards) for i in range(shards + 1)]
    return list(itertools.pairwise(bounds))


def _dist(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (x_sq - 2 * (x @ c) + c.dot(c)).clamp_min_(0).sqrt_()


@torch.no_grad()
def farthest_points(x: torch.Tensor, n: int, seed: int = 0, first: int | None = None) -> torch.Tensor:
    """Indices of ``n`` rows of ``x`` chosen by farthest-point traversal from ``first`` (default: a seeded start)."""
    total = x.shape[0]
    n = min(n, total)
    x_sq = (x * x).sum(1)
    if first is None:
        first = int(torch.randint(total, (1,), generator=torch.Generator().manual_seed(seed)))
    selected = torch.empty(n, dtype=torch.long)
    centres = x.new_empty(n, x.shape[1])
    selected[0], centres[0] = first, x[first]
    mind = _dist(x, x_sq, x[first])  # distance of every point to its nearest centre
    mind[first] = 0
    owner = torch.zeros(total, dtype=torch.long)  # which centre covers it
    radius = x.new_zeros(n)  # per cell: largest distance of a point it covers
    radius[0] = mind.max()
    tol = 1e-4 * float(radius[0])  # rounding of the expanded distance formula: duplicates, not new points
    in_cell = torch.zeros(n, dtype=torch.bool)
    for t in range(1, n):
        i = int(mind.argmax())
        if mind[i] <= tol:  # every point is (a duplicate of) a centre already
            return selected[:t]
        c = x[i]
        selected[t], centres[t] = i, c
        mind[i] = 0  # exactly, whatever the rounding of the expanded distance formula
        centre_dist = (centres[:t] - c).norm(dim=1)
        cand = centre_dist < 2 * radius[:t] * (1 + 1e-5) + 1e-6
        if int(cand.sum()) > t // 2:  # early: most cells are reachable, a full pass is cheaper
            d = _dist(x, x_sq, c)
            closer = d < mind
            mind = torch.where(closer, d, mind)
            owner[closer] = t
            radius.zero_().scatter_reduce_(0, owner, mind, "amax")
            continue
        in_cell[:t] = cand
        idx = in_cell[owner].nonzero().squeeze(1)
        d = _dist(x[idx], x_sq[idx], c)
        closer = d < mind[idx]
        moved = idx[closer]
        mind[moved] = d[closer]
        owner[moved] = t
        # exact new radii of the cells that were looked at (and of the new one)
        radius[:t].masked_fill_(cand, 0)
        radius.scatter_reduce_(0, owner[idx], mind[idx], "amax")
        in_cell[:t] = False
    return selected


def extend_farthest(features: torch.Tensor, covered: torch.Tensor, n: int, shard_size: int = 65536) -> torch.Tensor:
    """Indices of ``n`` rows of ``features`` that extend an existing coreset: farthest-point order
    seeded with each row's distance ``covered`` to that coreset, so rows it already covers come last.

    The incremental k-center step of a warm fit, where the new rows are few: a plain pass over a
    shard per pick (cost n * shard_size), shards of ``shard_size`` rows each taking their share.
    """
    total = features.shape[0]
    picks = []
    for lo, hi in shard_bounds(total, shard_size):
        x = features[lo:hi].float()
        x_sq, mind = (x * x).sum(1), covered[lo:hi].float().clone()
        share = min(hi - lo, max(1, round(n * (hi - lo) / total)))
        sel = torch.empty(share, dtype=torch.long)
        for t in range(share):
            i = int(mind.argmax())
            sel[t] = i
            mind = torch.minimum(mind, _dist(x, x_sq, x[i]))
            mind[i] = -1.0  # never picked twice, even among duplicates
        picks.append(lo + sel)
    return torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long)


def coverage_radius(features: torch.Tensor, bank: torch.Tensor, chunk: int = 8192) -> float:
    """Largest distance from any feature to its nearest bank entry (how well the bank covers)."""
    worst = 0.0
    b_sq = (bank * bank).sum(1)
    for i in range(0, features.shape[0], chunk):
        q = features[i:i + chunk].float()
        d = (q * q).sum(1, keepdim=True) - 2 * q @ bank.T + b_sq[None]
        worst = max(worst, float(d.min(1).values.clamp_min(0).max().sqrt()))
    return worst

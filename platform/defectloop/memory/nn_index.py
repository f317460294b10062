"""Nearest-neighbour indexes over a memory bank (strategy objects, pure torch).

On CPU the search over a bank of tens of thousands of entries would cost more than the backbone
itself, so banks above ``exact_max`` entries use :class:`IVFIndex`: entries are grouped into
k-means lists and each query scans only its ``nprobe`` closest lists (batched: one small GEMM per
list for all queries that probe it). Small banks use :class:`ExactIndex`.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch


class NNIndex(Protocol):
    """Strategy: distance to, and row of, the nearest bank entry for each query."""

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def sq_dists(q: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between rows of q and b (b_sq: squared norms of b)."""
    return ((q * q).sum(1, keepdim=True) - 2 * q @ b.T + b_sq[None]).clamp_min_(0)


def knn(queries: torch.Tensor, bank: torch.Tensor, k: int, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours: (distances Q x k, indices Q x k), sorted nearest first.

    Queries go in chunks whose distance block stays near 8 MB: larger blocks cost more in page
    faults for fresh allocations than they save in GEMM efficiency.
    """
    k = min(k, bank.shape[0])
    chunk = chunk or max(32, (1 << 21) // max(1, bank.shape[0]))
    b_sq = (bank * bank).sum(1)
    dists, idx = [], []
    for i in range(0, queries.shape[0], chunk):
        d, j = sq_dists(queries[i:i + chunk], bank, b_sq).topk(k, dim=1, largest=False)
        dists.append(d.sqrt_())
        idx.append(j)
    return torch.cat(dists), torch.cat(idx)


class ExactIndex:
    """Brute force: one GEMM per chunk of queries."""

    def __init__(self, bank: torch.Tensor):
        self.bank = bank.float().contiguous()

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d, i = knn(queries.float(), self.bank, 1)
        return d[:, 0], i[:, 0]


def kmeans(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0, sample: int = 65536) -> torch.Tensor:
    """Lloyd's k-means centroids (k x D) on a seeded subsample of at most ``sample`` rows."""
    g = torch.Generator().manual_seed(seed)
    if x.shape[0] > sample:
        x = x[torch.randperm(x.shape[0], generator=g)[:sample]]
    cent = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        assign = knn(x, cent, 1)[1][:, 0]
        sums = torch.zeros_like(cent).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()
        empty = counts == 0
        cent = torch.where(empty[:, None], cent, sums / counts.clamp_min(1)[:, None])
    return cent


class IVFIndex:
    """Inverted-file index: approximate nearest neighbour, exact within the probed lists.

    Args:
        bank: M x D entries.
        n_lists: number of k-means lists (default about sqrt(M)).
        nprobe: lists scanned per query; recall rises with it.
    """

    def __init__(self, bank: torch.Tensor, n_lists: int | None = None, nprobe: int = 8, seed: int = 0):
        bank = bank.float()
        self.n_lists = n_lists or max(1, int(round(math.sqrt(bank.shape[0]))))
        self.nprobe = min(nprobe, self.n_lists)
        self.centroids = kmeans(bank, self.n_lists, seed=seed)
        assign = knn(bank, self.centroids, 1)[1][:, 0]
        order = torch.argsort(assign, stable=True)
        self.order = order  # sorted position -> original row
        self.bank = bank[order].contiguous()
        self.bank_sq = (self.bank * self.bank).sum(1)
        counts = torch.bincount(assign, minlength=self.n_lists)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).tolist()
        self.cent_sq = (self.centroids * self.centroids).sum(1)

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = queries.float()
        probe = sq_dists(q, self.centroids, self.cent_sq).topk(self.nprobe, dim=1, largest=False).indices
        best = torch.full((q.shape[0],), float("inf"))
        best_row = torch.zeros(q.shape[0], dtype=torch.long)
        q_list = probe.reshape(-1)
        q_idx = torch.arange(q.shape[0]).repeat_interleave(self.nprobe)
        order = torch.argsort(q_list, stable=True)
        q_list, q_idx = q_list[order], q_idx[order]
        bounds = torch.searchsorted(q_list, torch.arange(self.n_lists + 1)).tolist()
        for lst in range(self.n_lists):
            lo, hi = bounds[lst], bounds[lst + 1]
            start, end = self.offsets[lst], self.offsets[lst + 1]
            if lo == hi or start == end:
                continue
            qi = q_idx[lo:hi]
            d, j = sq_dists(q[qi], self.bank[start:end], self.bank_sq[start:end]).min(1)
            better = d < best[qi]
            qb = qi[better]
            best[qb] = d[better]
            best_row[qb] = j[better] + start
        return best.sqrt_(), self.order[best_row]


def build_index(bank: torch.Tensor, exact_max: int = 4096, nprobe: int = 8, seed: int = 0) -> NNIndex:
    """The index a bank of this size should use (exact when small, IVF otherwise)."""
    if bank.shape[0] <= exact_max:
        return ExactIndex(bank)
    return IVFIndex(bank, nprobe=nprobe, seed=seed)

"""Nearest-neighbour indexes over a memory bank (strategy objects, pure torch).

On CPU the search over a bank of tens of thousands of entries would cost more than the backbone
itself, so banks above ``exact_max`` entries use :class:`IVFIndex`: entries are grouped into
k-means lists and each query scans only its ``nprobe`` closest lists (batched: one small GEMM per
list for all queries that probe it). Small banks use :class:`ExactIndex`.

The IVF ranks candidates with products in :func:`~defectloop.precision.matmul_dtype` (bfloat16
where the CPU has it) on residuals from the list centroids, which keeps the rounding small next to
the distances; the distance returned to the chosen entry is then recomputed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from defectloop.precision import matmul_dtype


class NNIndex(Protocol):
    """Strategy: distance to, and row of, the nearest bank entry for each query."""

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


#: strategy: builds the nearest-neighbour index a bank searches with (``build_index`` by default)
IndexFactory = Callable[[torch.Tensor], NNIndex]


def sq_dists(q: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between rows of q and b (b_sq: squared norms of b)."""
    return torch.addmm(b_sq, q, b.T, alpha=-2).add_((q * q).sum(1, keepdim=True)).clamp_min_(0)


def row_min(x: torch.Tensor, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum of each row of x and its first column: ``x.min(1)``, 4x faster on CPU.

    A reduction that tracks indices (min, topk) costs about 1 ns per entry on the dev machine,
    a plain amin about a tenth of that. So amin finds each block of ``block`` columns' minimum,
    and the column is searched only in each row's winning block (a distance block of 139 x 60k:
    topk 9.3 ms, min 4.7 ms, this 1.1 ms).
    """
    m, n = x.shape
    full = n - n % block
    if full == 0:
        return x.min(1)
    blocks = x[:, :full].unflatten(1, (-1, block))
    block_min = blocks.amin(2)
    b = block_min.argmin(1)
    d, j = block_min.gather(1, b[:, None])[:, 0], b * block + blocks[torch.arange(m), b].argmin(1)
    if full < n:  # the last, partial block
        d_tail, j_tail = x[:, full:].min(1)
        tail = d_tail < d
        d, j = torch.where(tail, d_tail, d), torch.where(tail, j_tail + full, j)
    return d, j


def smallest(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest entries of each row of x and their columns, ascending (ties: the first
    column): ``x.topk(k, largest=False)`` for a small k, 2x faster on CPU as k argmins (16384
    queries' distances to 158 lists, k = 4: topk 10.4 ms, this 5.0 ms)."""
    k = min(k, x.shape[1])
    work, rows = x.clone(), torch.arange(x.shape[0])
    cols = torch.empty(x.shape[0], k, dtype=torch.long)
    for i in range(k):
        cols[:, i] = work.argmin(1)
        work[rows, cols[:, i]] = float("inf")
    return x.gather(1, cols), cols


def knn(queries: torch.Tensor, bank: torch.Tensor, k: int, chunk: int | None = None,
        exclude: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours: (distances Q x k, indices Q x k), sorted nearest first.

    Always float32: ranking a whole bank in bfloat16 loses the nearest entry when the bank lies
    far from the origin next to its spread (clustered data: recall 0.87). Queries go in chunks
    of about 8M distances (measured on 4096 queries against 60k entries: 1.3x faster than 2M).
    ``exclude=(query_owner, bank_owner)`` leaves out, for each query, the bank rows that share
    its owner (distance inf when nothing else is left). The bank is searched sorted by owner, so
    a query's own rows are one run of columns, and only those are set to inf (comparing every
    query's owner with every row's added 40% to the search). The nearest entry alone (k = 1,
    what every caller asks) comes from :func:`row_min`.

    Every chunk writes into buffers allocated once. With a fresh ~32 MB distance block per chunk
    and small results kept in between, glibc's heap fragmented: a warm DMAD retraining grew by
    about one block per chunk, 4 -> 21 GB in 50 s, and was OOM-killed (now it peaks at 3.8 GB).
    """
    queries, bank = queries.float(), bank.float()
    n, k = queries.shape[0], min(k, bank.shape[0])
    chunk = min(n, chunk or max(32, (1 << 23) // max(1, bank.shape[0])))
    if exclude is not None:
        order = torch.argsort(exclude[1], stable=True)
        bank, owners = bank[order], exclude[1][order]
        own_lo = torch.searchsorted(owners, exclude[0], side="left")
        own_n = torch.searchsorted(owners, exclude[0], side="right") - own_lo
    b_sq = bank.pow(2).sum(1)
    dists, idx = torch.empty(n, k), torch.empty(n, k, dtype=torch.long)
    partial = torch.empty(chunk, bank.shape[0])
    for i in range(0, n, chunk):
        q = queries[i:i + chunk]
        m = q.shape[0]
        torch.addmm(b_sq, q, bank.T, alpha=-2, out=partial[:m])  # squared distances less ||q||^2
        if exclude is not None:  # (row, column) of every query's own rows
            counts = own_n[i:i + m]
            rows = torch.arange(m).repeat_interleave(counts)
            run_start = torch.repeat_interleave(own_lo[i:i + m] - (counts.cumsum(0) - counts), counts)
            partial[:m].index_put_((rows, run_start + torch.arange(len(rows))), torch.tensor(float("inf")))
        d, j = dists[i:i + m], idx[i:i + m]
        if k == 1:
            # the nearest entry's distance computed directly: the expansion above loses small ones to
            # cancellation (a patch's distance to its own entry came out up to 0.03, not 0, and
            # differed with the bank's size), and it costs one subtraction per query
            j[:, 0] = row_min(partial[:m])[1]
            torch.linalg.vector_norm(q - bank[j[:, 0]], dim=1, out=d[:, 0])
            if exclude is not None:  # nothing else left: inf, as the expansion says
                d[:, 0].masked_fill_(torch.isinf(partial[torch.arange(m), j[:, 0]]), float("inf"))
        else:
            torch.topk(partial[:m], k, dim=1, largest=False, out=(d, j))
            d.add_(q.pow(2).sum(1, keepdim=True)).clamp_min_(0).sqrt_()
    return dists, (idx if exclude is None else order[idx])


class ExactIndex:
    """Brute force: one GEMM per chunk of queries."""

    def __init__(self, bank: torch.Tensor):
        self.bank = bank.float().contiguous()

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d, i = knn(queries, self.bank, 1)
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


def split_bf16(x: torch.Tensor) -> torch.Tensor:
    """x as two columns, hi + lo, that sum to x to ~16 significant bits even in bfloat16."""
    hi = x.bfloat16().float()
    return torch.stack([hi, x - hi], 1)


class IVFIndex:
    """Inverted-file index: approximate nearest neighbour, exact within the probed lists.

    An entry b of list c is kept as its residual r = b - c, and a query q probing c as its own
    residual s = q - c: ||q - b||^2 = ||s||^2 - 2 s.r + ||r||^2. Each residual carries its squared
    norm as two extra columns (hi + lo, see :func:`split_bf16`), so that one product per list
    yields the squared distances themselves: in bfloat16 their rounding is then relative to the
    distance, not to the residuals' norms (which would swap near ties: recall 0.989 against
    0.9994), and the loop over lists is one GEMM and one min.

    The defaults, about sqrt(M)/2 lists with 4 probed, scan the same share of the bank as sqrt(M)
    lists with 8 probed at half the per-list overhead (a topk over the lists per query, one GEMM
    and one min per list, which together cost as much as the scanning). Measured on the unified
    dev bank (60k entries, the 16384 patches of 16 test images): 59 ms against 86 ms, recall 0.966
    against 0.984 (mean distance excess 0.18% against 0.06%); on the dev benchmark's fitted models,
    image AUROC -0.2 (PatchCore) and -0.1 (DMAD-10), pixel AUROC unchanged, scoring throughput
    0.66x -> 0.76x the backbone for DMAD-10 and 0.73x -> 0.79x for PatchCore. Larger lists hold
    larger residuals, hence coarser bfloat16 ranking on tightly clustered banks (synthetic: recall
    0.978 against 0.999 in float32); on the dev bank float32 gains little (0.973) at 1.9x the time.

    3 lists probed, not 4: on the bank of the dev set with the screw as 3 x 3 tiles (100k entries,
    the 16384 patches of one tiled screw image and 7 whole images), 58 ms against 70 ms at recall
    0.979 against 0.986 (mean distance excess 0.08% against 0.03%); 221 lists with 4 probed took
    68 ms (0.986), 111 with 3 63 ms (0.972).

    Args:
        bank: M x D entries.
        n_lists: number of k-means lists (default about sqrt(M) / 2).
        nprobe: lists scanned per query; recall rises with it.
    """

    def __init__(self, bank: torch.Tensor, n_lists: int | None = None, nprobe: int = 3, seed: int = 0):
        bank = bank.float()
        self.features = bank
        self.dtype = matmul_dtype()
        self.n_lists = n_lists or max(1, int(round(math.sqrt(bank.shape[0]) / 2)))
        self.nprobe = min(nprobe, self.n_lists)
        self.centroids = kmeans(bank, self.n_lists, seed=seed)
        self.cent_sq = self.centroids.pow(2).sum(1)
        assign = knn(bank, self.centroids, 1)[1][:, 0]
        self.order = torch.argsort(assign, stable=True)  # sorted position -> original row
        res = bank[self.order] - self.centroids[assign[self.order]]
        ones = torch.ones(len(res), 2)
        self.entries = torch.cat([-2 * res, split_bf16(res.pow(2).sum(1)), ones], 1).to(self.dtype)
        counts = torch.bincount(assign, minlength=self.n_lists)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).tolist()

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = queries.float()
        n = q.shape[0]
        probe_d, probe = smallest(sq_dists(q, self.centroids, self.cent_sq), self.nprobe)
        # (query, list) pairs grouped by list: each list's queries are one contiguous block
        pair_list, order = probe.reshape(-1).sort(stable=True)
        pair_q = torch.arange(n).repeat_interleave(self.nprobe)[order]
        pair_cols = torch.cat([torch.ones(len(pair_q), 2), split_bf16(probe_d.reshape(-1)[order])], 1)
        pair_d = torch.full((len(pair_q),), float("inf"))
        pair_row = torch.zeros(len(pair_q), dtype=torch.long)
        bounds = torch.searchsorted(pair_list, torch.arange(self.n_lists + 1)).tolist()
        for lst in range(self.n_lists):
            lo, hi = bounds[lst], bounds[lst + 1]
            start, end = self.offsets[lst], self.offsets[lst + 1]
            if lo == hi or start == end:
                continue
            res = torch.cat([q.index_select(0, pair_q[lo:hi]) - self.centroids[lst], pair_cols[lo:hi]], 1)
            d, j = (res.to(self.dtype) @ self.entries[start:end].T).min(1)
            pair_d[lo:hi] = d.float()
            pair_row[lo:hi] = j + start
        # each query's two best pairs (from two lists), ranked again by float32 distance: coarse
        # bfloat16 distances tie often, and ties must not leave the choice to the order of writes
        by_query_d, by_query_row = torch.empty_like(pair_d), torch.empty_like(pair_row)
        by_query_d[order], by_query_row[order] = pair_d, pair_row
        cand = by_query_d.view(n, -1).topk(min(2, self.nprobe), dim=1, largest=False).indices
        rows = self.order[by_query_row.view(n, -1).gather(1, cand)]
        d, pick = (q[:, None] - self.features[rows]).norm(dim=2).min(1)
        return d, rows.gather(1, pick[:, None])[:, 0]


def build_index(bank: torch.Tensor, exact_max: int = 384, nprobe: int = 3, seed: int = 0) -> NNIndex:
    """The index a bank of this size should use: exact when small, IVF otherwise (16384 queries on
    subsets of the dev bank, measured: exact 10 ms and IVF 14 ms at 256 entries, IVF 1.7x faster
    at 512, 2.4x at 1024 and 8x at 4096, recall 0.987-0.992)."""
    if bank.shape[0] <= exact_max:
        return ExactIndex(bank)
    return IVFIndex(bank, nprobe=nprobe, seed=seed)

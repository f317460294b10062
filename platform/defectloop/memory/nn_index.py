"""Nearest-neighbour indexes over a memory bank (strategy objects, pure torch).

On CPU the search over a bank of tens of thousands of entries would cost more than the backbone
itself, so banks above ``exact_max`` entries use :class:`IVFIndex`: entries are grouped into
k-means lists and each query scans only the few lists it lies near (batched: one small GEMM per
list for all queries that probe it). Small banks use :class:`ExactIndex`.

The IVF ranks candidates with products in :func:`~defectloop.precision.matmul_dtype` (bfloat16
where the CPU has it) on residuals from the list centroids, which keeps the rounding small next to
the distances; the distance returned to the chosen entry is then recomputed in float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Protocol

import torch

from defectloop.precision import matmul_dtype


class NNIndex(Protocol):
    """Strategy: distance to, and row of, the nearest bank entry for each query.

    ``within`` (one distance per query, optional): the caller needs the distance only where it
    is below this. An index may then answer a query whose nearest entry it can prove farther
    with a distance not below ``within`` and row -1, without searching further.
    """

    def search(self, queries: torch.Tensor, within: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...


#: strategy: builds the nearest-neighbour index a bank searches with (``build_index`` by default)
IndexFactory = Callable[[torch.Tensor], NNIndex]


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


def nearer_columns(entries: torch.Tensor, maps: torch.Tensor, f_sq: torch.Tensor, than: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where a few entries (M x C) come nearer than ``than`` (B x P) to the columns of feature
    maps (B x C x P, with their squared norms ``f_sq``, B x P): those (map, column) positions
    (K x 2), the exact distance to the nearest entry, and its row.

    The maps are searched as they lie, channels first. Turning a pool's maps into patch rows
    first copied every feature: 40% of the pool's search after an annotation (0.32 of 0.8 s for
    the 1,000 dev test images), and the norms, summed across channels, cost twice the products:
    the caller keeps them. Products rank every pair in float32; only the positions they put
    within a rounding margin of ``than`` are measured directly (a few per thousand).
    """
    maps, entries = maps.float(), entries.float()
    e_sq = entries.pow(2).sum(1)
    d2, rows = torch.matmul(entries, maps).mul_(-2).add_(e_sq[:, None]).min(1)
    d2.add_(f_sq)
    # float32 products of dim terms err by far less than this share of the norms (2^-24 * dim)
    cand = (d2 < than.float().square() + 1e-4 * (f_sq + e_sq.max())).nonzero()
    m, col = cand.unbind(1)
    r = rows[m, col]
    d = torch.linalg.vector_norm(maps[m, :, col] - entries[r], dim=1)
    keep = d < than[m, col]
    return cand[keep], d[keep], r[keep]


class ExactIndex:
    """Brute force: one GEMM per chunk of queries.

    With ``within``, a first pass in the matmul type (bfloat16 where native) bounds every
    query's nearest distance from below, and only the queries whose bound falls below
    ``within`` are searched exactly. DMAD asks for its abnormal distance only where it is below
    the normal one (elsewhere the abnormal term of the score is 0): for the 25.9k patches that 32
    tiles of the dev benchmark's test set need, that leaves 0.02% of them, and the search of the
    202 synthetic defect entries takes 5.8 ms against 12.5 ms. The bound is rigorous (see
    :func:`product_lower_bound`), so scores are those of the exact search.
    """

    def __init__(self, bank: torch.Tensor):
        self.bank = bank.float().contiguous()
        self.dtype = matmul_dtype()

    @functools.cached_property
    def _screen(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(the bank's mean, its entries as :func:`entry_rows`, their largest norm about the mean)
        for the first pass; None where it would not pay (float32 costs what the search does)."""
        if self.dtype == torch.float32 or not len(self.bank):
            return None
        mean = self.bank.mean(0)
        moved = self.bank - mean
        return mean, entry_rows(moved, moved.pow(2).sum(1), self.dtype), float(moved.norm(dim=1).max())

    def search(self, queries: torch.Tensor, within: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        screen = None if within is None else self._screen
        if screen is None:
            d, i = knn(queries, self.bank, 1)
            return d[:, 0], i[:, 0]
        mean, entries, radius = screen
        q = queries.float()
        rows, norm = query_rows(q, mean, self.dtype)
        lower = product_lower_bound((rows @ entries.T).amin(1).float(), norm, radius, self.dtype, q.shape[1])
        need = (lower < within.float().pow(2)).nonzero()[:, 0]
        d = torch.maximum(lower.clamp_min(0).sqrt(), within.float())  # a distance not below within
        i = torch.full((len(q),), -1, dtype=torch.long)
        if len(need):
            d_need, i_need = knn(q[need], self.bank, 1)
            d[need], i[need] = d_need[:, 0], i_need[:, 0]
        return d, i


def query_rows(q: torch.Tensor, mean: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries as rows [q - mean, 1, 1, ||q - mean||^2] (the norm as hi + lo) in ``dtype``, and
    their norms ||q - mean||: a product with :func:`entry_rows` gives squared distances."""
    n, dim = q.shape
    moved = q - mean
    sq = moved.pow(2).sum(1)
    rows = torch.empty(n, dim + 4, dtype=dtype)
    rows[:, :dim], rows[:, dim:dim + 2], rows[:, dim + 2:] = moved, 1, split_bf16(sq)
    return rows, sq.sqrt()


def entry_rows(moved: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Entries as rows [-2 e, offset, 1, 1] (the offset as hi + lo) in ``dtype``: against
    :func:`query_rows`, ||q' - e||^2 when ``offset`` is ||e||^2."""
    return torch.cat([-2 * moved, split_bf16(offset), torch.ones(len(moved), 2)], 1).to(dtype)


def product_lower_bound(approx: torch.Tensor, norm: torch.Tensor, radius: float, dtype: torch.dtype,
                        dim: int) -> torch.Tensor:
    """A lower bound on the squared distance of a query to its nearest entry, from the least
    product of its :func:`query_rows` row with the :func:`entry_rows` rows (``approx``), the
    query's norm and the entries' largest norm ``radius`` (both after the mean is taken off).

    Rounding of a product whose inputs are rounded to ``dtype`` (unit roundoff u: 2^-8 for
    bfloat16), accumulated in float32 and rounded to ``dtype`` again, for q and e of norms a and
    b: the inputs cost at most (4u + 2u^2) ab (Cauchy-Schwarz over -2 q.e), the hi + lo norms
    u^2 (a^2 + b^2), the float32 sum of dim + 4 terms (dim + 4) 2^-24 (a + b)^2 (1 + 2u), the
    output u times itself. Taken twice, for margin.
    """
    u = torch.finfo(dtype).eps / 2
    err = (4 * u + 2 * u * u) * norm * radius + (u * u + (dim + 4) * 2.0 ** -24 * (1 + 2 * u)) * (norm + radius) ** 2
    return approx / (1 + u) - 2 * err


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

    Entries are grouped into k-means lists; a query scans the lists whose centroids are nearest.
    All vectors are first moved by the bank's mean mu (q' = q - mu), so that bfloat16 rounds
    them relative to the bank's spread rather than to its offset from the origin. An entry b of
    list c is kept as its residual r = b - c: with s = q - c,
    ||q - b||^2 = ||s||^2 - 2 q'.r + (2 c'.r + ||r||^2). A (query, list) pair is the row
    [q', 1, 1, ||s||^2] and an entry the row [-2r, 2 c'.r + ||r||^2, 1, 1] (each norm as two
    columns, hi + lo, see :func:`split_bf16`), so that one product per list yields the squared
    distances themselves: in bfloat16 their rounding is then relative to the distance (ranking
    on the bare products swapped near ties: recall 0.989 against 0.9994), and the loop over
    lists is one GEMM and one min. A query's row is cut once for all its pairs, not a residual
    per pair and list as before.

    A query scans up to ``nprobe`` lists: the nearest, and the next ones whose centroid lies
    within ``1 + spread`` times its squared distance. Most queries lie well inside one list and
    scan one or two; those near a boundary scan more. Where the two best lists' best entries come
    within ``tie`` (relative, squared) of each other in bfloat16, both are ranked again in
    float32; elsewhere only the best is measured.

    Measured on the bank of the dev set with the screw as 3 x 3 tiles (100k entries, 158 lists),
    for the 25.9k patches that 32 tiles' maps need, against the 3 nearest lists always scanned
    with per-pair residuals (interleaved in one process): 60 ms against 79 ms, nearest-entry
    recall 0.972 against 0.972, mean distance excess 0.11% against 0.18%; the lists scanned
    hold 1834 entries per query against 2416. On a tightly clustered synthetic bank the mean
    moves off the clusters and costs a little precision (recall 0.972 against 0.979).

    About sqrt(M)/2 lists: the same share of the bank as sqrt(M) lists at half the per-list
    overhead (one GEMM and one min per list). Larger lists hold larger residuals, hence coarser
    bfloat16 ranking on tightly clustered banks (synthetic: recall 0.978 against 0.999 in
    float32); on the dev bank float32 gained little at 1.9x the time.

    Args:
        bank: M x D entries.
        n_lists: number of k-means lists (default about sqrt(M) / 2).
        nprobe: the most lists a query scans.
        spread: how much farther (relative, squared) than the nearest a list's centroid may be
            and still be scanned.
        tie: how near (relative, squared) the second list's best must come to be measured too.
    """

    def __init__(self, bank: torch.Tensor, n_lists: int | None = None, nprobe: int = 4, spread: float = 0.5,
                 tie: float = 0.05, seed: int = 0):
        bank = bank.float()
        self.features = bank
        self.dtype = matmul_dtype()
        self.n_lists = n_lists or max(1, int(round(math.sqrt(bank.shape[0]) / 2)))
        self.nprobe, self.spread = min(nprobe, self.n_lists), spread
        self.tie = tie
        self.mean = bank.mean(0)
        centroids = kmeans(bank, self.n_lists, seed=seed)
        assign = knn(bank, centroids, 1)[1][:, 0]
        self.order = torch.argsort(assign, stable=True)  # sorted position -> original row
        moved = centroids - self.mean  # c'
        self.centroid_rows = entry_rows(moved, moved.pow(2).sum(1), self.dtype)
        res = bank[self.order] - centroids[assign[self.order]]
        self.entries = entry_rows(res, 2 * (moved[assign[self.order]] * res).sum(1) + res.pow(2).sum(1), self.dtype)
        counts = torch.bincount(assign, minlength=self.n_lists)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).tolist()

    def search(self, queries: torch.Tensor, within: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(``within`` is not used: every query is searched.)"""
        q = queries.float()
        n, dim = q.shape
        rows = query_rows(q, self.mean, self.dtype)[0]
        to_list = (rows @ self.centroid_rows.T).float().clamp_min_(0)  # ||s||^2 (rounding: a query on a centroid < 0)
        scanned = to_list <= to_list.amin(1, keepdim=True) * (1 + self.spread)
        counts = scanned.sum(1, dtype=torch.int32)  # a bool sum into int64 is 8x slower on CPU
        crowded = (counts > self.nprobe).nonzero()[:, 0]
        if len(crowded):  # more lists that near than a query may scan: the nearest ones
            scanned[crowded] = False
            scanned[crowded[:, None], smallest(to_list[crowded], self.nprobe)[1]] = True
            counts[crowded] = self.nprobe
        # the (query, list) pairs scanned, grouped by list: each list's queries are one contiguous block
        pair_q, pair_list = scanned.nonzero().unbind(1)  # by query
        slots = pair_q * self.nprobe + torch.arange(len(pair_q)) - (counts.cumsum(0) - counts)[pair_q]  # n x nprobe table
        pair_list, order = pair_list.sort(stable=True)
        pair_q, slots = pair_q[order], slots[order]
        pairs = rows[pair_q]
        pairs[:, dim + 2:] = split_bf16(to_list[pair_q, pair_list])
        pair_d = torch.full((len(slots),), float("inf"))
        pair_row = torch.zeros(len(slots), dtype=torch.long)
        bounds = torch.searchsorted(pair_list, torch.arange(self.n_lists + 1)).tolist()
        for lst in range(self.n_lists):
            lo, hi = bounds[lst], bounds[lst + 1]
            start, end = self.offsets[lst], self.offsets[lst + 1]
            if lo == hi or start == end:  # no query, or a k-means list left empty
                continue
            d, j = (pairs[lo:hi] @ self.entries[start:end].T).min(1)
            pair_d[lo:hi] = d.float()
            pair_row[lo:hi] = j + start
        # each query's best entry by float32 distance; where its second list's best comes near (the
        # coarse bfloat16 distances tie often), both are ranked again in float32: the choice must not
        # be left to the order of writes
        table_d = torch.full((n * self.nprobe,), float("inf"))
        table_row = torch.zeros(n * self.nprobe, dtype=torch.long)
        table_d[slots], table_row[slots] = pair_d, pair_row
        top_d, cand = table_d.view(n, -1).topk(min(2, self.nprobe), dim=1, largest=False)
        best = self.order[table_row.view(n, -1).gather(1, cand)]
        d = torch.linalg.vector_norm(self.features[best[:, 0]].sub_(q), dim=1)
        nearest = best[:, 0].clone()
        if self.nprobe > 1:
            close = (top_d[:, 1] <= top_d[:, 0] * (1 + self.tie)).nonzero()[:, 0]
            d_second = torch.linalg.vector_norm(self.features[best[close, 1]].sub_(q[close]), dim=1)
            nearer = d_second < d[close]
            d[close] = torch.where(nearer, d_second, d[close])
            nearest[close] = torch.where(nearer, best[close, 1], nearest[close])
        return d, nearest


#: the most entries a bank searches exactly (``build_index``); above it, an IVF
EXACT_MAX = 384


def build_index(bank: torch.Tensor, exact_max: int = EXACT_MAX, seed: int = 0) -> NNIndex:
    """The index a bank of this size should use: exact when small, IVF otherwise (16384 queries on
    subsets of the dev bank, measured: exact 10 ms and IVF 14 ms at 256 entries, IVF 1.7x faster
    at 512, 2.4x at 1024 and 8x at 4096, recall 0.987-0.992)."""
    if bank.shape[0] <= exact_max:
        return ExactIndex(bank)
    return IVFIndex(bank, seed=seed)

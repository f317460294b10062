import pytest
import torch

from defectloop.memory import (
    AbnormalBank,
    ExactIndex,
    IVFIndex,
    KCenterGreedy,
    NormalBank,
    Provenance,
    knn,
    nn_index,
)
from defectloop.memory.coreset import coverage_radius, extend_farthest, farthest_points


def _assert_farthest_point_order(x, sel, mind, rtol=1e-5):
    """Each selected row is (up to rounding) the farthest from those before it: the plain greedy
    k-center. Exact index equality would fail on near ties, whose order depends on how a CPU's
    kernels round (pruned and plain loops swapped steps 149 and 150 on one machine, not another)."""
    mind = mind.clone()
    for i in sel.tolist():
        assert mind[i] >= mind.max() * (1 - rtol)
        mind = torch.minimum(mind, (x - x[i]).norm(dim=1))


def _clustered(n=6000, d=24, k=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 4
    return centres[torch.randint(k, (n,), generator=g)] + torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g)


def test_pruned_kcenter_keeps_the_farthest_point_order():
    x = _clustered()
    sel = farthest_points(x, 400, seed=3)
    assert len(set(sel.tolist())) == 400
    assert sel[0] == int(torch.randint(len(x), (1,), generator=torch.Generator().manual_seed(3)))
    _assert_farthest_point_order(x, sel[1:], (x - x[sel[0]]).norm(dim=1))


def test_extend_farthest_adds_what_the_coreset_does_not_cover():
    """Seeded with distances to an existing coreset: the plain greedy's order, covered rows last."""
    x = _clustered(n=3000)
    old = x[farthest_points(x[:2000], 100)]
    new = x[2000:]
    covered = knn(new, old, 1)[0][:, 0]
    sel = extend_farthest(new, covered, 50, shard_size=4096)
    assert len(set(sel.tolist())) == 50
    _assert_farthest_point_order(new, sel, covered)
    assert coverage_radius(new, torch.cat([old, new[sel]])) < coverage_radius(new, old)
    dup = torch.cat([old[:10], torch.randn(5, old.shape[1]) * 10])  # 10 rows the coreset holds already
    picked = extend_farthest(dup, knn(dup, old, 1)[0][:, 0], 5).tolist()
    assert sorted(picked) == list(range(10, 15))
    assert len(extend_farthest(x, torch.zeros(len(x)), 90, shard_size=1000)) == 90  # shards take their shares


def test_kcenter_covers_better_than_random():
    x = _clustered(d=3)
    sel = KCenterGreedy().select(x, 200)
    rnd = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:200]
    assert coverage_radius(x, x[sel]) < 0.8 * coverage_radius(x, x[rnd])


def test_kcenter_with_duplicates_stops_early():
    x = torch.zeros(50, 4)
    x[:5] = torch.randn(5, 4)
    sel = farthest_points(x, 20)
    assert len(sel) <= 6 and len(set(sel.tolist())) == len(sel)


def test_exact_index_matches_brute_force():
    bank, q = torch.randn(500, 16), torch.randn(300, 16)
    d, i = ExactIndex(bank).search(q)
    ref = torch.cdist(q, bank)
    assert torch.equal(i, ref.argmin(1))
    assert torch.allclose(d, ref.min(1).values, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ivf_index_recall(monkeypatch, dtype):
    """Lists ranked in bfloat16 (where the CPU is fast at it) on a tightly clustered bank: recall
    0.971-0.989 over seeds (float32: 0.999), distances on average within 0.3-1.1% of the exact
    ones (bfloat16 rounds the queries relative to their distance from the bank's mean, which such
    a bank makes large next to the distances between neighbours)."""
    monkeypatch.setattr(nn_index, "matmul_dtype", lambda: dtype)
    bank = _clustered(8000, 32)
    q = bank[:2000] + 0.1 * torch.randn(2000, 32, generator=torch.Generator().manual_seed(0))
    d, i = IVFIndex(bank).search(q)  # the defaults, as scoring uses them
    _, ie = ExactIndex(bank).search(q)
    assert (i == ie).float().mean() > 0.96
    assert torch.allclose(d, (q - bank[i]).norm(dim=1), atol=1e-3)
    d_exact = (q - bank[ie]).norm(dim=1)
    assert ((d - d_exact) / d_exact).mean() < 0.015


def test_ivf_index_scans_the_nearest_lists_up_to_nprobe(monkeypatch):
    """Every list within the spread is scanned, but never more than nprobe: with all lists in
    reach and nprobe of them allowed, the answer is the nearest entry of the nprobe nearest lists."""
    monkeypatch.setattr(nn_index, "matmul_dtype", lambda: torch.float32)
    bank = _clustered(3000, 16)
    q = bank[:300] + 0.5 * torch.randn(300, 16, generator=torch.Generator().manual_seed(1))
    _, exact = ExactIndex(bank).search(q)
    every = IVFIndex(bank, nprobe=10_000, spread=float("inf"))
    assert torch.equal(every.search(q)[1], exact)
    two = IVFIndex(bank, nprobe=2, spread=float("inf"))
    assert two.n_lists > 2
    d, i = two.search(q)
    centroids = torch.stack([bank[two.order[a:b]].mean(0) for a, b in zip(two.offsets, two.offsets[1:], strict=False)])
    of_entry = torch.empty(len(bank), dtype=torch.long)
    of_entry[two.order] = torch.repeat_interleave(torch.arange(two.n_lists), torch.tensor(two.offsets).diff())
    near_lists = torch.cdist(q, centroids).topk(2, largest=False).indices
    allowed = (of_entry[None, :, None] == near_lists[:, None, :]).any(2)  # queries x entries
    expected = torch.cdist(q, bank).masked_fill(~allowed, float("inf")).min(1)
    assert (i == expected.indices).float().mean() > 0.97  # list centroids are k-means', not recomputed means
    assert (d >= torch.cdist(q, bank).min(1).values - 1e-4).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_index_within_is_exact_below_it(monkeypatch, dtype):
    """Asked only below ``within``, the index answers exactly there; elsewhere with a distance not
    below ``within`` (true distances too), and a first pass in bfloat16 spares most far queries."""
    monkeypatch.setattr(nn_index, "matmul_dtype", lambda: dtype)
    g = torch.Generator().manual_seed(0)
    bank = 5 + torch.randn(200, 32, generator=g)
    q = torch.cat([bank[:50] + 0.05 * torch.randn(50, 32, generator=g), 5 + 3 * torch.randn(450, 32, generator=g)])
    index = ExactIndex(bank)
    d_all, i_all = index.search(q)
    within = torch.full((len(q),), 4.0)
    d, i = index.search(q, within)
    searched = i >= 0
    assert torch.equal(d[searched], d_all[searched]) and torch.equal(i[searched], i_all[searched])
    assert (d_all < within)[:50].all() and searched[d_all < within].all()
    assert (d[~searched] >= within[~searched]).all() and (d_all[~searched] >= within[~searched]).all()
    if dtype == torch.bfloat16:
        assert searched[50:].float().mean() < 0.5
    else:  # no first pass: a float32 one would cost what the search does
        assert searched.all()


@pytest.mark.parametrize("n", [1, 255, 256, 257, 1000])
def test_row_min_is_min_with_its_first_column(n):
    x = torch.randn(40, n, generator=torch.Generator().manual_seed(n))
    x[0] = float("inf")  # nothing left (every entry excluded)
    x[1] = 1.0  # all tied: the first column
    x[2, -1] = -9.0  # the minimum in the partial last block
    x[3, n // 2] = -9.0
    d, j = nn_index.row_min(x)
    ref_d, ref_j = x.min(1)
    assert torch.equal(d, ref_d) and torch.equal(j, ref_j)


def test_knn_leaves_out_the_queries_own_entries():
    bank, q = torch.randn(200, 8), torch.randn(30, 8)
    bank_owner, q_owner = torch.arange(200) % 5, torch.arange(30) % 7  # owners 5 and 6 own no rows
    d, i = knn(q, bank, 3, chunk=7, exclude=(q_owner, bank_owner))  # chunks of 7 queries
    assert (bank_owner[i] != q_owner[:, None]).all()
    ref = torch.cdist(q, bank).masked_fill(q_owner[:, None] == bank_owner[None], float("inf"))
    assert torch.allclose(d, ref.topk(3, largest=False).values, atol=1e-4)
    assert torch.equal(i, ref.topk(3, largest=False).indices)
    d1, i1 = knn(q, bank, 1, chunk=7, exclude=(q_owner, bank_owner))  # k = 1: row_min, as callers ask
    assert torch.equal(i1[:, 0], ref.argmin(1)) and torch.allclose(d1[:, 0], ref.min(1).values, atol=1e-4)
    d, _ = knn(q, bank[:40], 1, exclude=(torch.zeros(30, dtype=torch.long), torch.zeros(40, dtype=torch.long)))
    assert torch.isinf(d).all()  # nothing but the query's own entries


def test_matmul_dtype_follows_the_environment(monkeypatch):
    from defectloop import precision

    for value, dtype in (("0", torch.float32), ("1", torch.bfloat16)):
        monkeypatch.setenv("DEFECTLOOP_BF16", value)
        precision.matmul_dtype.cache_clear()
        assert precision.matmul_dtype() == dtype
    monkeypatch.delenv("DEFECTLOOP_BF16")
    precision.matmul_dtype.cache_clear()
    assert precision.matmul_dtype() in (torch.float32, torch.bfloat16)  # this CPU's choice


def test_matmul_dtype_trusts_cpu_flags_over_timing(monkeypatch):
    """The flags decide where known, so a loaded CPU cannot flip the choice between processes."""
    from defectloop import precision

    monkeypatch.delenv("DEFECTLOOP_BF16", raising=False)
    for native, speedup, dtype in ((True, 0.5, torch.bfloat16), (False, 9.0, torch.float32),
                                   (None, 3.0, torch.bfloat16), (None, 1.2, torch.float32)):
        monkeypatch.setattr(precision, "native_bf16", lambda n=native: n)
        monkeypatch.setattr(precision, "bf16_speedup", lambda s=speedup: s)
        precision.matmul_dtype.cache_clear()
        assert precision.matmul_dtype() == dtype
    monkeypatch.undo()
    monkeypatch.delenv("DEFECTLOOP_BF16", raising=False)
    precision.matmul_dtype.cache_clear()
    native = precision.native_bf16()
    if native is not None:  # x86: the same answer every time, whatever the load
        assert {precision.matmul_dtype.__wrapped__() for _ in range(3)} == {
            torch.bfloat16 if native else torch.float32}
    assert precision.bf16_speedup(rounds=3) > 0


def test_knn_sorted():
    d, i = knn(torch.randn(10, 8), torch.randn(50, 8), 5)
    assert d.shape == (10, 5) and (d[:, 1:] >= d[:, :-1]).all()


def test_abnormal_bank_idempotent_by_annotation(tmp_path):
    bank = AbnormalBank(4)
    p = Provenance("ann-1", "img-1", "screw", "scratch")
    bank.add(p, torch.ones(3, 4))
    bank.add(p, torch.ones(3, 4))  # webhook delivered twice
    assert len(bank) == 3
    bank.add(p, torch.zeros(5, 4))  # annotation edited
    assert len(bank) == 5 and bank.tensors()[0].sum() == 0
    bank.add(Provenance("ann-2", "img-2"), torch.ones(2, 4))
    v = bank.version
    bank.save(tmp_path)
    loaded = AbnormalBank.load(tmp_path)
    assert len(loaded) == 7 and loaded.version == v
    assert [a.annotation_id for a in loaded.annotations] == ["ann-1", "ann-2"]
    assert loaded.remove("ann-1") and not loaded.remove("ann-1")
    assert len(loaded) == 2 and loaded.version == v + 1


def test_normal_bank_roundtrip(tmp_path):
    bank = NormalBank(torch.randn(10, 4), ["a", "b"], torch.tensor([0, 1] * 5))
    bank.save(tmp_path)
    loaded = NormalBank.load(tmp_path)
    assert torch.equal(loaded.features, bank.features) and loaded.image_ids == ["a", "b"]


KNN_MEMORY = """
import resource, torch
from defectloop.memory import knn
torch.manual_seed(0)
bank, q = torch.randn(20000, 64), torch.randn(40000, 64)
owners = torch.randint(0, 1300, (20000,)), torch.randint(0, 1300, (40000,))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(2):
    knn(q, bank, 1, exclude=(owners[1], owners[0]))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_knn_memory_stays_flat_over_many_chunks():
    """A leave-one-image-out search over a bank runs hundreds of ~32 MB chunks; allocating them
    afresh fragmented glibc's heap by 1-3 GB here (the retraining that was OOM-killed at 21 GB).
    In a fresh process, so that nothing else has shaped the heap."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", KNN_MEMORY], capture_output=True, text=True, check=True).stdout
    assert int(out.split()[-1]) < 300, f"peak RSS grew by {out.split()[-1]} MB"

import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from defectloop.features import mask_cells
from defectloop.memory import EXACT_MAX, ExactIndex, Provenance
from defectloop.metrics import auroc
from defectloop.models import (
    ANY_CATEGORY,
    BANKS,
    HEAD,
    AbnormalMemory,
    Calibration,
    Choice,
    Fitter,
    HeadChoices,
    create_model,
    load_model,
)
from defectloop.models.prediction import PostProcessor
from defectloop.registry import Registry


@pytest.fixture(scope="module")
def features(tiny_features):
    """Features of the generated set with 2 seen anomalies per category."""
    return tiny_features(2)


@pytest.fixture(scope="module")
def fitted(features, small_config):
    train, _ = features
    models = {}
    for kind in ("patchcore", "dmad"):
        m = create_model(small_config(kind, dmad={"steps": 150}))
        Fitter(m).fit(train)
        models[kind] = m
    return models


@pytest.mark.parametrize("kind", ["patchcore", "dmad"])
def test_defects_score_higher_than_normals(fitted, features, kind):
    _, test = features
    scores, maps = fitted[kind].score_features(test.features)
    labels = np.array([s.label for s in test.samples])
    assert auroc(scores.numpy(), labels) > 0.9
    assert maps.shape == (len(test.samples), 128, 128)
    masks = torch.stack([m for m in test.masks])
    assert auroc(maps.numpy(), (masks > 0.5).numpy()) > 0.9


def test_dmad_uses_real_and_synthetic_anomalies(fitted):
    provs = fitted["dmad"].abnormal_bank.annotations
    assert {p.source for p in provs} == {"annotation", "synthetic"}
    assert len([p for p in provs if p.source == "annotation"]) == 6


def test_calibrated_thresholds_per_category(fitted):
    cal = fitted["dmad"].calibration
    assert set(cal) == {"tile", "disc", "mesh", ANY_CATEGORY}
    assert all(e.n >= 1 for e in cal.entries.values())
    assert cal.threshold("unknown-category") == cal.entries[ANY_CATEGORY].threshold
    assert not cal.knows("unknown-category") and cal.knows("disc")


def test_a_category_with_few_held_back_images_is_not_calibrated_on_their_maximum():
    """One held-back image would make its score the threshold (a queue of false alarms): below
    MIN_CALIBRATION images the threshold is the mean plus a widened spread, pooled from the
    categories with enough images; the method is kept in the calibration."""
    rng = np.random.default_rng(0)
    big = rng.normal(1.0, 0.1, 200)
    cats = ["big"] * 200 + ["one"]
    scores = torch.tensor([*big, 2.0], dtype=torch.float32)
    cal = Calibration.fit(cats, scores, scores * 3, 0.99)
    assert cal.methods() == {ANY_CATEGORY: "quantile", "big": "quantile", "one": "robust"}
    z = 2.3263
    assert cal.threshold("big") == pytest.approx(np.quantile(big, 0.99), rel=1e-4)
    assert cal.threshold("one") == pytest.approx(2.0 + z * np.sqrt(2) * big.std(ddof=1), rel=1e-3)
    assert cal.pixel_threshold("one") == pytest.approx(6.0 + z * np.sqrt(2) * 3 * big.std(ddof=1), rel=1e-3)
    assert cal.decide(2.0 + 0.2, "one") == "normal"  # within the normal spread of its one image
    lonely = Calibration.fit(["a"], torch.tensor([4.0]), torch.tensor([4.0]), 0.99)  # nothing to pool from
    assert lonely.threshold("a") == pytest.approx(4.0 + z * np.sqrt(2) * 0.4, rel=1e-3)


def test_confirmed_labels_move_their_category_threshold():
    """Confirmed pool images move their category's threshold: normals alone raise it over them (the
    highest while there are few); normals and defects put it halfway across the gap that
    misclassifies the fewest of them; a handful of normals never lowers it, enough of them do. Only
    in its own category; normalised scores (the queue's order) stay on the fitted threshold."""
    fitted = Calibration.fit(["a"] * 20 + ["b"] * 20, torch.linspace(0, 1, 40), torch.linspace(0, 3, 40), 0.99)
    cats = ["a", "a", "a", "a", "b", "c"]
    scores = torch.tensor([2.0, 3.0, 0.2, 2.5, 5.0, 9.0])  # a: normals 2.0, 0.2 and 3.0; a defect at 2.5
    anomalous = torch.tensor([False, False, False, True, False, False])
    cal = fitted.from_labels(cats, scores, anomalous, 0.99)
    assert cal.threshold("a") == pytest.approx(2.25)  # the 3.0 normal is wrong either way: the cut misses one
    assert cal.decide(2.2, "a") == "normal" and cal.decide(2.3, "a") == "anomalous"
    assert cal.get("a").labels == 4 and cal.methods()["a"] == "quantile+labels"
    assert cal.get("a").fitted == fitted.threshold("a") and cal.get("a").as_fitted() == fitted.get("a")
    assert cal.pixel_threshold("a") == fitted.pixel_threshold("a")
    assert cal.normalise(2.2, "a") == fitted.normalise(2.2, "a") > 0.5  # the queue's order: as fitted
    assert cal.threshold("b") == 5.0 and cal.get("b").labels == 1  # normals only: raised over them
    assert cal.threshold("c") == fitted.threshold("c")  # a category of its own thresholds only: "*" stays as fitted
    assert cal.get(ANY_CATEGORY) == fitted.get(ANY_CATEGORY)
    low = fitted.from_labels(["a"], torch.tensor([-1.0]), torch.tensor([False]), 0.99)
    assert low == fitted  # a normal below the fitted threshold: nothing to raise, never lowered
    many = fitted.from_labels(["a"] * 300, torch.linspace(1, 4, 300), torch.zeros(300, dtype=torch.bool), 0.99)
    assert 3.9 < many.threshold("a") < 4.0  # 300 normals: their 99% quantile, not the highest
    # defects under the fitted threshold (0.49): three normals below them do not lower it, twelve do
    assert fitted.threshold("a") == pytest.approx(0.49, abs=0.01)
    few = fitted.from_labels(["a"] * 6, torch.tensor([0.0, 0.05, 0.1, 0.3, 0.35, 0.4]), torch.arange(6) >= 3, 0.99)
    assert few == fitted
    normals = torch.linspace(0.0, 0.11, 12)
    lowered = fitted.from_labels(["a"] * 15, torch.cat([normals, torch.tensor([0.3, 0.35, 0.4])]),
                                 torch.arange(15) >= 12, 0.99)
    assert lowered.threshold("a") == pytest.approx((0.11 + 0.3) / 2) and lowered.get("a").labels == 15
    assert Calibration.loads(json.dumps({c: asdict(e) for c, e in cal.entries.items()})) == cal
    # a version saved when confirmed normals could only raise a threshold
    old = {c: {k: v for k, v in asdict(e).items() if k not in ("labels", "fitted")} for c, e in cal.entries.items()}
    old["a"].update(confirmed=3, raised_from=fitted.threshold("a"))
    assert Calibration.loads(json.dumps(old)).get("a") == replace(cal.get("a"), labels=3)


def test_confirmed_masks_set_their_category_mask_edge():
    """As fitted, a map is cut at the pixel threshold, so a strong defect's mask spreads far past
    it. Three confirmed masks or more set the category's mask edge as a share of each image's rise
    above the normal level, the share whose masks fit the confirmed ones best; then a faint defect
    and a strong one get masks their size. Fewer masks, or none better than the fitted cut, keep
    the fitted cut; the edge is saved with the thresholds, and served (PostProcessor)."""
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")

    def defect(amplitude: float, cy: float, cx: float) -> tuple[torch.Tensor, torch.Tensor]:
        blob = amplitude * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 6.0**2))
        return 1.0 + blob, blob > amplitude / 2  # on the normal level (1.0); the defect: its half-maximum

    fitted = Calibration.fit(["a"] * 20 + ["b"] * 20, torch.full((40,), 1.0) + torch.linspace(0, 0.2, 40),
                             torch.full((40,), 1.5) + torch.linspace(0, 0.2, 40), 0.99)
    a = fitted.get("a")
    maps, masks = zip(*[defect(amp, 20 + 4 * i, 30) for i, amp in enumerate((2.0, 8.0, 30.0, 4.0))], strict=True)
    maps, masks = torch.stack(maps), torch.stack(masks)
    cal = fitted.with_mask_levels(["a", "a", "a", "b"], maps, masks)
    edge = cal.get("a")
    assert 0.35 <= edge.mask_level <= 0.6 and edge.mask_labels == 3 and cal.methods()["a"] == "quantile+masks"
    assert cal.get("b") == fitted.get("b")  # one mask: as fitted

    def iou(c: Calibration, i: int) -> float:
        shown = maps[i] > c.pixel_threshold("a", float(maps[i].max()))
        return float((shown & masks[i]).sum() / (shown | masks[i]).sum())

    assert all(iou(cal, i) > 0.8 for i in range(4))  # faint or strong, the mask fits (the 4th was not seen)
    assert iou(fitted, 2) < 0.3  # the strong one, cut at the pixel threshold: several times its size
    assert cal.pixel_threshold("a") == a.pixel_threshold  # without a map, the fitted cut
    served = PostProcessor(64, 0.0).predictions(maps.flatten(1).max(1).values, maps, ["a"] * 4, cal)
    assert served[2].pixel_threshold == pytest.approx(edge.mask_cut(float(maps[2].max())))
    assert Calibration.loads(json.dumps({c: asdict(e) for c, e in cal.entries.items()})).get("a").mask_level == edge.mask_level
    assert replace(edge, mask_labels=7) == edge  # a mask that leaves the edge where it was changes nothing
    assert cal.with_mask_levels([], maps[:0], masks[:0]) == fitted  # the masks gone: as fitted
    exact = masks.float() * 2 + 1.0  # maps the fitted cut already fits: it stays
    assert fitted.with_mask_levels(["a"] * 4, exact, masks).get("a") == a


@pytest.mark.parametrize("kind", ["patchcore", "dmad"])
def test_save_load_bit_exact(fitted, features, kind, tmp_path):
    _, test = features
    fitted[kind].save(tmp_path / kind)
    loaded = load_model(tmp_path / kind)
    a, ma = fitted[kind].score_features(test.features)
    b, mb = loaded.score_features(test.features)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert json.loads((tmp_path / kind / "config.json").read_text())["kind"] == kind


def test_abnormal_bank_change_moves_scores_at_once(fitted, features):
    """A newly confirmed mask changes DMAD's scores before any retraining."""
    model = fitted["dmad"]
    _, test = features
    i = next(k for k, s in enumerate(test.samples) if s.label == 1)
    before, _ = model.score_features(test.features[i:i + 1])
    cells = mask_cells(test.features[i], test.masks[i], model.config.dmad.mask_coverage)
    prov = Provenance("ls-annotation-42", test.samples[i].image_id, test.samples[i].category, "scratch")
    model.abnormal_bank.add(prov, cells)
    after, _ = model.score_features(test.features[i:i + 1])
    model.abnormal_bank.remove("ls-annotation-42")
    restored, _ = model.score_features(test.features[i:i + 1])
    assert after.item() > before.item() + 1e-3  # a confirmed defect makes its image more anomalous
    assert restored.item() == before.item()


def test_pool_scores_follow_the_abnormal_bank_at_the_cost_of_what_changed(fitted, features, tmp_path):
    """A pool's patch scores, refreshed after adding, editing and removing annotations, equal a fresh
    scoring; only the images whose scores moved are reported."""
    _, test = features
    fitted["dmad"].save(tmp_path / "m")
    model = load_model(tmp_path / "m", index=ExactIndex)  # exact search both ways: equal to the last bit's noise
    pool = model.pool_scores(test.features)

    def fresh() -> torch.Tensor:
        return model.patch_scores(test.features)

    def check(moved: torch.Tensor, before: torch.Tensor) -> None:
        check_pool(pool, fresh(), moved, before)

    assert torch.equal(pool.of(torch.arange(len(test.features))), fresh()) and len(pool.refresh()) == 0
    i = next(k for k, s in enumerate(test.samples) if s.label == 1)
    cells = mask_cells(test.features[i], test.masks[i], model.config.dmad.mask_coverage)
    prov = Provenance("ls-7", test.samples[i].image_id, test.samples[i].category, "scratch")
    before = fresh()
    model.abnormal_bank.add(prov, cells)
    moved = pool.refresh()
    assert i in moved.tolist()
    check(moved, before)
    assert pool.defects(torch.tensor([i])) == ["scratch"]  # its own mask is its nearest abnormal memory
    assert torch.allclose(pool.without(i, {"ls-7"}), before[i], atol=1e-5)  # as its look-alikes see the memory
    before = fresh()
    model.abnormal_bank.add(prov, cells[:1])  # an edit: fewer cells
    check(pool.refresh(), before)
    before = fresh()
    model.forget("ls-7")
    check(pool.refresh(), before)
    before = fresh()
    model.forget(model.abnormal_bank.annotations[0].annotation_id)  # an entry the pool scored against at first
    check(pool.refresh(), before)
    assert len(pool.refresh()) == 0
    # more entries at once than are searched in the pool's maps: through the memory's index
    bad = [k for k, s in enumerate(test.samples) if s.label == 1][:3]
    many = test.features[bad].permute(0, 2, 3, 1).reshape(-1, test.features.shape[1])
    assert len(many) > EXACT_MAX
    before = fresh()
    model.abnormal_bank.add(Provenance("ls-8", "many", test.samples[bad[0]].category, "scratch"), many)
    moved = pool.refresh()
    assert set(bad) <= set(moved.tolist())
    check(moved, before)


@pytest.mark.parametrize("kind", ["patchcore", "dmad"])
def test_pool_scores_grow_with_imported_images(fitted, features, kind, tmp_path):
    """Images imported into a scored pool are scored alone, against the memory as it is then (an
    annotation added before, and one removed), and later refreshes stay exact for all."""
    _, test = features
    fitted[kind].save(tmp_path / "m")
    model = load_model(tmp_path / "m", index=ExactIndex)
    half = len(test.features) // 2
    pool = model.pool_scores(test.features[:half])
    everything = torch.arange(len(test.features))
    if kind == "dmad":  # the memory moves between the pool's last refresh and the import
        i = next(k for k, s in enumerate(test.samples[:half]) if s.label == 1)
        model.abnormal_bank.add(Provenance("ls-8", test.samples[i].image_id, test.samples[i].category, "scratch"),
                                mask_cells(test.features[i], test.masks[i], model.config.dmad.mask_coverage))
        model.forget(model.abnormal_bank.annotations[0].annotation_id)
    pool.grow(test.features)
    torch.testing.assert_close(pool.of(everything[half:]), model.patch_scores(test.features[half:]), atol=1e-5, rtol=0)
    pool.refresh()
    torch.testing.assert_close(pool.of(everything), model.patch_scores(test.features), atol=1e-5, rtol=0)
    if kind == "dmad":
        before = model.patch_scores(test.features)
        model.forget("ls-8")
        check_pool(pool, model.patch_scores(test.features), pool.refresh(), before)


def check_pool(pool, now: torch.Tensor, moved: torch.Tensor, before: torch.Tensor) -> None:
    """The pool's refreshed scores equal a fresh scoring (``now``), and every image that moved is reported."""
    assert torch.allclose(pool.of(torch.arange(len(now))), now, atol=1e-5)
    changed = ((now - before).abs() > 1e-6).flatten(1).any(1).nonzero()[:, 0]
    assert set(changed.tolist()) <= set(moved.tolist()) and len(moved) < len(now)


def test_a_confirmed_normal_is_normal_evidence_at_once(fitted, features, tmp_path):
    """An image confirmed normal adds, at the coreset ratio, the patches of it the normal memory
    covers worst: its own score and its look-alikes' drop at once, the pool follows at the cost of
    what changed, the evidence survives a save, and forgetting it gives the scores back."""
    from defectloop.data import load_image
    from defectloop.memory import target_size

    _, test = features
    fitted["dmad"].save(tmp_path / "m")
    model = load_model(tmp_path / "m", index=ExactIndex)
    pool = model.pool_scores(test.features)
    first = model.patch_scores(test.features)
    i = max((k for k, s in enumerate(test.samples) if s.label == 0), key=lambda k: float(first[k].max()))
    prov = Provenance("normal:x", test.samples[i].image_id, test.samples[i].category, "good")
    held = model.memory_by_category()[prov.category]["normal"]
    n = model.confirm_normal(prov, load_image(test.samples[i].path))
    cells = first.shape[1] * first.shape[2]
    assert n == len(model.normal_evidence) == target_size(cells, model.config.coreset_ratio)
    moved = pool.refresh()
    after = model.patch_scores(test.features)
    check_pool(pool, after, moved, first)
    assert i in moved.tolist() and float(after[i].max()) < float(first[i].max())
    assert torch.allclose(pool.without(i, {"normal:x"}), first[i], atol=1e-5)  # without its own evidence
    assert model.memory_by_category()[prov.category]["normal"] == held + n

    model.save(tmp_path / "m2")
    again = load_model(tmp_path / "m2", index=ExactIndex)
    assert torch.allclose(again.patch_scores(test.features), after, atol=1e-5)

    model.confirm_normal(prov, load_image(test.samples[i].path))  # the same image again: replaced, not added
    assert len(model.normal_evidence) == n
    check_pool(pool, model.patch_scores(test.features), pool.refresh(), after)
    assert model.forget("normal:x") and len(model.normal_evidence) == 0
    moved = pool.refresh()
    check_pool(pool, model.patch_scores(test.features), moved, after)
    assert torch.allclose(pool.of(torch.arange(len(test.features))), first, atol=1e-5)


@pytest.mark.parametrize("kind", ["patchcore", "dmad"])
def test_retraining_uses_confirmed_defects(tiny_features, small_config, confirmed_defects, kind):
    """Confirmed defects from the pool are in the new version's bank, and DMAD's scorer trains on them."""
    train, test = tiny_features(0)
    model = create_model(small_config(kind))
    confirmed = confirmed_defects(test, model.config.dmad.mask_coverage)
    stats = Fitter(model).fit(train, confirmed=confirmed)
    assert len(confirmed) == 3 and stats["confirmed_annotations"] == 3
    # only a model that reads an abnormal bank keeps one (PatchCore would carry a bank it never reads)
    assert isinstance(model, AbnormalMemory) == (kind == "dmad")
    if kind == "dmad":  # no masks in the training split: every real abnormal patch is a confirmed one
        assert all(p.annotation_id in model.abnormal_bank for p, _ in confirmed)
        assert [p for p, _ in model.confirmed()] == [p for p, _ in confirmed]
        assert stats["real_abnormal_patches"] == sum(len(c) for _, c in confirmed) > 0
        # an image called anomalous without a mask: its top patches, at once and in the next fit, down-weighted
        from dataclasses import replace

        from defectloop.data import load_image

        i = next(k for k, s in enumerate(test.samples) if s.label == 1 and f"ls:{s.image_id}" not in model.abnormal_bank)
        prov = Provenance("ls:weak", test.samples[i].image_id, test.samples[i].category)
        before = float(model.score_features(test.features[i:i + 1])[0][0])
        k = model.confirm_anomalous(prov, load_image(test.samples[i].path))
        assert k == max(1, round(model.config.dmad.weak_patches * test.features[0, 0].numel()))
        assert float(model.score_features(test.features[i:i + 1])[0][0]) > before
        weak = [(p, c) for p, c in model.confirmed() if p.source == "weak"]
        assert [p for p, _ in weak] == [replace(prov, source="weak")] and len(weak[0][1]) == k
        again = create_model(small_config(kind))
        stats = Fitter(again).fit(train, confirmed=model.confirmed())
        assert stats["real_abnormal_patches"] == sum(len(c) for _, c in confirmed)  # the weak ones are not "real"
        assert "ls:weak" in again.abnormal_bank


@pytest.mark.parametrize("kind", ["patchcore", "dmad"])
def test_warm_fit_keeps_what_the_model_learned(tiny_features, small_config, confirmed_defects, kind):
    """A warm refit (the retraining's default) keeps the bank's entries and adds only from new images;
    DMAD's scorer continues from its weights and input statistics; calibration stays on held-back images."""
    from defectloop.features import Extracted
    from defectloop.models.holdout import split_holdout

    train, test = tiny_features(0)
    late = {s.image_id for s in train.samples if s.label == 0 and s.path.stem[-1] in "05"}  # come later
    first = [i for i, s in enumerate(train.samples) if s.image_id not in late]
    old = Extracted(train.features[first], [train.samples[i] for i in first], [train.masks[i] for i in first])
    model = create_model(small_config(kind))
    with pytest.raises(ValueError, match="warm fit"):
        Fitter(model).fit(old, warm=True)
    Fitter(model).fit(old)
    before = model.normal_bank
    stats_before = {k: v.clone() for k, v in model.head_state().items() if k.split(".")[-1] in ("mean", "std", "scale")}
    confirmed = confirmed_defects(test, model.config.dmad.mask_coverage)
    stats = Fitter(model).fit(train, warm=True, confirmed=confirmed)
    after = model.normal_bank
    # an image's side of the calibration split does not move when images are added
    held_old = {old.samples[i].image_id for i in split_holdout(old.samples, 0.1, 0)[1]}
    held_new = {train.samples[i].image_id for i in split_holdout(train.samples, 0.1, 0)[1]}
    assert held_old <= held_new
    assert stats["warm"] and stats["new_normal_images"] >= len(late - held_new) > 0 and stats["normal_bank_added"] > 0
    if kind == "dmad":  # it fine-tunes: the warm step count, not a fit's
        assert stats["head_steps"] == model.config.dmad.warm_steps != model.config.dmad.steps
    assert torch.equal(after.features[:len(before)], before.features)
    assert [after.image_ids[o] for o in after.owners[:len(before)].tolist()] == \
        [before.image_ids[o] for o in before.owners.tolist()]
    added = {after.image_ids[o] for o in after.owners[len(before):].tolist()}
    assert added and added.isdisjoint(before.image_ids)
    assert held_new.isdisjoint(after.image_ids)  # calibration never on images the bank holds
    for k, v in stats_before.items():
        assert torch.equal(model.head_state()[k], v), k
    if isinstance(model, AbnormalMemory):
        assert all(p.annotation_id in model.abnormal_bank for p, _ in confirmed)
    scores, _ = model.score_features(test.features)
    assert auroc(scores.numpy(), np.array([s.label for s in test.samples])) > 0.9


def test_confirmed_normals_held_back_are_calibrated_on_never_fitted(tiny_features, small_config):
    """A retraining's held-back confirmed normals join the calibration images alone, and the others
    keep their side of the split."""
    from defectloop.models.holdout import split_holdout

    train, _ = tiny_features(0)
    normals = [s for s in train.samples if s.label == 0]
    forced = {normals[0].image_id, normals[-1].image_id}
    fit0, held0 = split_holdout(train.samples, 0.1, 0)
    fit1, held1 = split_holdout(train.samples, 0.1, 0, always_held=forced)
    ids = lambda idx: {train.samples[i].image_id for i in idx}  # noqa: E731
    assert forced <= ids(held1) and forced.isdisjoint(ids(fit1))
    assert ids(held1) == ids(held0) | forced and ids(fit1) == ids(fit0) - forced
    model = create_model(small_config("patchcore"))
    stats = Fitter(model).fit(train, calibration_only=forced)
    assert stats["n_calibration"] == len(held1)
    assert forced.isdisjoint(model.normal_bank.image_ids)


def test_same_config_and_data_give_the_same_model(features, small_config):
    """Fits are reproducible: the learned head's initial weights come from the config's seed."""
    train, test = features
    a, b = (create_model(small_config("dmad", dmad={"steps": 20})) for _ in range(2))
    torch.manual_seed(123)  # the global RNG's state must not matter
    Fitter(a).fit(train)
    Fitter(b).fit(train)
    assert torch.equal(a.score_features(test.features)[0], b.score_features(test.features)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dmad_correction_is_the_mean_of_independent_heads(fitted, features, monkeypatch, dtype):
    """Each head trains on its own batches from its own start, and the score averages them: at
    scoring time with the adaptors folded into the first layers (bfloat16 where fast)."""
    import torch.nn.functional as F

    from defectloop.models import dmad

    monkeypatch.setattr(dmad, "matmul_dtype", lambda: dtype)
    model, (_, test) = fitted["dmad"], features
    sc, heads = model.scorer, model.scorer.heads
    assert len(heads) == model.config.dmad.heads == 3
    first = [h.mlp[0].weight for h in heads]
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    f = test.features[:2]
    with torch.no_grad():
        e = model.enhance(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
        log_dn, log_da = torch.log1p(e.d_n / sc.scale), torch.log1p(e.d_a / sc.scale)
        each = torch.stack([h((e.q - sc.mean) / sc.std, e.r_n / sc.std, log_dn) for h in heads])  # head by head, float32
        expected = log_dn + F.relu(log_dn - log_da) + each.mean(0)
        tol = 1e-5 if dtype == torch.float32 else 0.02
        torch.testing.assert_close(sc(e), expected, atol=tol, rtol=0)
        assert (each[0] - each[1]).abs().max() > 1e-3  # the heads disagree somewhere: not copies


def test_registry_versions_current_rollback(fitted, tmp_path):
    reg = Registry(tmp_path / "reg")
    assert reg.current() is None
    v1 = reg.register(fitted["patchcore"])
    v2 = reg.register(fitted["dmad"], metrics={"note": "x"})
    assert reg.ids() == [v1, v2] and reg.current() == v2
    assert [v.current for v in reg.list()] == [False, True]
    assert reg.rollback() == v1 and reg.current() == v1
    assert reg.load().kind == "patchcore"
    with pytest.raises(LookupError):
        reg.path("v9999")


def test_failed_save_leaves_registry_unchanged(fitted, tmp_path, monkeypatch):
    reg = Registry(tmp_path / "reg")
    v1 = reg.register(fitted["patchcore"])

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(fitted["dmad"].abnormal_bank, "save", boom)
    with pytest.raises(OSError):
        reg.register(fitted["dmad"])
    assert reg.ids() == [v1] and reg.current() == v1
    assert reg.store.keys("versions") == [k for k in reg.store.keys("versions") if k.startswith(f"versions/{v1}/")]


def test_map_operator_is_upsampling_then_gaussian():
    """The two-GEMM anomaly map equals bilinear upsampling followed by a reflect-padded Gaussian."""
    from scipy.ndimage import gaussian_filter1d

    from defectloop.models.prediction import map_operator

    p = torch.rand(3, 32, 24, dtype=torch.float64)
    up = torch.nn.functional.interpolate(p[:, None], size=(256, 256), mode="bilinear", align_corners=False)[:, 0]
    ref = gaussian_filter1d(gaussian_filter1d(up.numpy(), 4.0, axis=1, mode="mirror", truncate=4.0),
                            4.0, axis=2, mode="mirror", truncate=4.0)
    ours = map_operator(32, 256, 4.0).double() @ p @ map_operator(24, 256, 4.0).double().T
    assert np.abs(ours.numpy() - ref).max() < 1e-5


def test_versions_saved_with_flat_settings_still_load(fitted, features, tmp_path):
    """config.json of versions written before the per-model sections (flat keys, an empty `extra`)."""
    from defectloop.models import ModelConfig

    model = fitted["dmad"]
    model.save(tmp_path / "v")
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    flat = {**{k: v for k, v in cfg.items() if k not in ("dmad", "crad")}, **cfg["dmad"],
            **{f"crad_{k}": v for k, v in cfg["crad"].items() if k not in ("use_global", "lr")},
            "crad_global": cfg["crad"]["use_global"], "extra": {}}
    (tmp_path / "v" / "config.json").write_text(json.dumps(flat))
    loaded = load_model(tmp_path / "v")
    assert loaded.config == model.config
    _, test = features
    assert torch.equal(loaded.score_features(test.features[:3])[0], model.score_features(test.features[:3])[0])
    with pytest.raises(ValueError, match="unknown model config keys: typo, dmad.stepz"):
        ModelConfig.from_dict({"typo": 1, "dmad": {"stepz": 3}})


def test_sampler_and_index_are_injected(features, small_config, tmp_path):
    """The coreset sampler and the banks' nearest-neighbour index are strategies chosen by the caller."""
    from defectloop.memory import ExactIndex, IVFIndex, RandomSampler

    train, _ = features
    model = create_model(small_config("patchcore"), index=ExactIndex)
    Fitter(model, sampler=RandomSampler).fit(train)
    kcenter = create_model(small_config("patchcore"))
    Fitter(kcenter).fit(train)
    assert len(kcenter.normal_bank) == len(model.normal_bank) > 384  # above build_index's exact limit
    assert not torch.equal(kcenter.normal_bank.features, model.normal_bank.features)
    assert isinstance(model.normal_bank.index, ExactIndex) and isinstance(kcenter.normal_bank.index, IVFIndex)
    model.save(tmp_path / "v")
    assert isinstance(load_model(tmp_path / "v", index=ExactIndex).normal_bank.index, ExactIndex)


def test_the_head_serves_a_category_only_where_held_back_labels_prefer_it(tmp_path):
    """Before judging, the head serves where it trained on real masks of the category, the banks'
    score elsewhere; held-back labels overturn that where the other ranks them better: a higher
    image AUROC, or at equal AUROC a clearly wider separation. Never judged: the banks."""
    cats = ["a"] * 4 + ["b"] * 4 + ["c"] * 3 + ["d"] * 2 + ["e"] * 2 + ["f"] * 4
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1])
    head = torch.tensor([0.1, 0.2, 0.9, 0.8, 0.1, 0.55, 0.5, 0.6, 0.1, 0.2, 0.3, 0.1, 0.5, 0.1, 0.2, 0.1, 0.2, 0.81, 0.9])
    banks = torch.tensor([0.1, 0.5, 0.4, 0.9, 0.1, 0.2, 0.9, 0.8, 0.1, 0.2, 0.3, 0.1, 0.5, 0.1, 0.2, 0.1, 0.2, 0.8, 0.9])
    choices = HeadChoices.choose(cats, labels, head, banks, masks={"b": 3, "d": 1, "e": 2, "f": 2})
    served = {c: choices.entries[c].serves for c in "abcdef"}
    # a: the head ranks better; b: the banks, whatever it trained on; d (one of each) and f (a
    # separation within noise): ties, so the head that trained on masks
    assert served == {"a": HEAD, "b": BANKS, "c": BANKS, "d": HEAD, "e": HEAD, "f": HEAD}
    assert choices.entries["a"].head_auroc == 1.0 and choices.entries["a"].banks_auroc == 0.75
    assert "no real mask" in choices.entries["c"].why and choices.entries["c"].normals == 3
    assert "trained on 2 real mask(s)" in choices.entries["e"].why and "a tie" in choices.entries["f"].why
    assert HeadChoices.choose(cats[-4:], labels[-4:], head[-4:], banks[-4:]).entries["f"].serves == BANKS  # no masks
    assert choices.entries["d"].head_separation == choices.entries["d"].banks_separation  # one of each: a tie
    assert choices.serves_head("a") and not choices.serves_head("never-judged")
    choices.save(tmp_path / "heads.json")
    again = HeadChoices.load(tmp_path / "heads.json")
    assert again.as_dict() == choices.as_dict()
    assert HeadChoices.load(tmp_path / "none.json").serves_head("a")  # versions from before: the head everywhere


def test_masked_defects_held_back_judge_the_head(fitted, features):
    """Of two masked training defects per category one is held back from the head's training (it
    stays in the abnormal bank) and, with the held-back normals, judges the head per category."""
    from defectloop.models.holdout import split_validation

    train, _ = features
    model = fitted["dmad"]
    defects = [(s.image_id, s.category, m is not None) for s, m in zip(train.samples, train.masks, strict=True) if s.label]
    held = split_validation(defects, model.config.dmad.validation_fraction, model.config.seed)
    assert sorted(i.split("/")[0] for i in held) == ["disc", "mesh", "tile"]
    assert split_validation([*defects, ("disc/x.png", "disc", False)], 0.2, model.config.seed) == held | {"disc/x.png"}
    assert len([p for p in model.abnormal_bank.annotations if p.source == "annotation"]) == 6
    choices = model.head_choices
    assert set(choices.entries) == {"disc", "mesh", "tile"} and choices.default == BANKS
    assert all(c.defects == 1 and c.normals >= 1 and c.head_auroc is not None for c in choices.entries.values())


def test_a_category_is_scored_by_what_serves_it(fitted, features, tmp_path):
    """Patches follow the category of their nearest normal-bank entry: the head's score where it
    serves, the banks' evidence alone (PatchCore's distance, raised near confirmed defects)
    elsewhere; the pool's scores follow, and the choice survives a save."""
    import torch.nn.functional as F

    from defectloop.memory import knn

    _, test = features
    fitted["dmad"].save(tmp_path / "m")
    model = load_model(tmp_path / "m", index=ExactIndex)
    assert model.head_choices.as_dict() == fitted["dmad"].head_choices.as_dict()
    scores = {}
    for mode in (HEAD, BANKS):
        model.head_choices = HeadChoices(default=mode)
        scores[mode] = model.patch_scores(test.features)
    q = test.features.permute(0, 2, 3, 1).reshape(-1, test.features.shape[1])
    e, sc = model.enhance(q), model.scorer
    log_dn = torch.log1p(e.d_n / sc.scale)
    torch.testing.assert_close(scores[BANKS].flatten(), log_dn + F.relu(log_dn - torch.log1p(e.d_a / sc.scale)))
    assert (scores[HEAD] != scores[BANKS]).any()
    model.head_choices = HeadChoices({"disc": Choice(HEAD, "test")}, BANKS)
    bank = model.normal_bank
    rows = knn(q, bank.features, 1)[1][:, 0]
    near = [bank.image_ids[o] for o in bank.owners[rows].tolist()]
    disc = torch.tensor([i.startswith("disc/") for i in near]).view(scores[HEAD].shape)
    assert 0 < disc.float().mean() < 1
    mixed = model.patch_scores(test.features)
    assert torch.equal(mixed, torch.where(disc, scores[HEAD], scores[BANKS]))
    model.head_choices = HeadChoices({"mesh": Choice(HEAD, "test")}, BANKS)  # the cached gate follows a new choice
    mesh = torch.tensor([i.startswith("mesh/") for i in near]).view(scores[HEAD].shape)
    assert torch.equal(model.patch_scores(test.features), torch.where(mesh, scores[HEAD], scores[BANKS]))
    model.head_choices = HeadChoices({"disc": Choice(HEAD, "test")}, BANKS)
    assert torch.allclose(model.pool_scores(test.features).of(torch.arange(len(test.features))), mixed, atol=1e-6)
    model.save(tmp_path / "m2")
    assert torch.equal(load_model(tmp_path / "m2", index=ExactIndex).patch_scores(test.features), mixed)


def test_unsupervised_dmad_serves_the_banks_score(tiny_features, small_config):
    """Without a labeled defect nothing can judge the head: every category is served by the banks'
    score, PatchCore's nearest-normal distance where no defect is near."""
    train, test = tiny_features(0)
    model = create_model(small_config("dmad", dmad={"steps": 40}))
    stats = Fitter(model).fit(train)
    assert stats["heads"]["default"] == BANKS
    assert {c["serves"] for c in stats["heads"]["categories"].values()} == {BANKS}
    assert all("no real mask" in c["why"] for c in stats["heads"]["categories"].values())
    patchcore = create_model(small_config("patchcore"))
    Fitter(patchcore).fit(train)
    labels = np.array([s.label for s in test.samples])
    a_dmad, a_pc = (auroc(m.score_features(test.features)[0].numpy(), labels) for m in (model, patchcore))
    assert a_dmad >= a_pc - 0.005, (a_dmad, a_pc)

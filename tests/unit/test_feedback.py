"""Selection policies and annotation feedback, on generated images (no server)."""

import numpy as np
import pytest

from defectloop.data import load_image, load_split
from defectloop.labeling.brush import BrushRLE
from defectloop.labeling.feedback import (
    MASK_CELLS,
    Feedback,
    Verdict,
    decode_cells,
    encode_cells,
    read_annotation,
)
from defectloop.labeling.label_config import LabelConfig, build_label_config
from defectloop.labeling.policies import (
    Adaptive,
    Candidate,
    CategoryOdds,
    Diverse,
    Labeled,
    make_policy,
    rank_scores,
)
from defectloop.memory import Provenance
from defectloop.models import held_back
from defectloop.registry import Registry

CONFIG = LabelConfig.parse(build_label_config(["scratch", "blob"]))


def candidates():
    rng = np.random.default_rng(0)
    # two clusters of near-identical anomalous images, and normal ones
    out = [Candidate(i, 0.9 - i * 0.001, np.array([0.0, 0.0]) + rng.normal(0, 0.01, 2)) for i in range(10)]
    out += [Candidate(100 + i, 0.85 - i * 0.001, np.array([5.0, 5.0]) + rng.normal(0, 0.01, 2)) for i in range(10)]
    out += [Candidate(200 + i, 0.2 + i * 0.03, np.array([9.0, 0.0])) for i in range(10)]
    return out


def test_policies():
    c = candidates()
    assert make_policy("top").select(c, 3) == [0, 1, 2]
    assert make_policy("borderline").select(c, 2) == [209, 208]  # scores 0.47, 0.44: nearest 0.5
    diverse = Diverse(pool_factor=10).select(c, 2)  # the 20 most anomalous: both clusters
    assert diverse[0] == 0 and diverse[1] >= 100  # one from each cluster, not two copies of one defect
    assert make_policy("diverse").select(c, 2)[0] == 0
    # per category: the best of each in turn, so the low-scoring category is not starved
    cats = [Candidate(x.task_id, x.score, x.embedding, "low" if x.task_id >= 200 else "high") for x in c]
    assert make_policy("per-category").select(cats, 5) == [0, 209, 1, 208, 2]
    assert make_policy("per-category").select(cats[:3], 5) == [0, 1, 2]  # one category: the top policy
    r1, r2 = make_policy("random", seed=1).select(c, 5), make_policy("random", seed=1).select(c, 5)
    assert r1 == r2 and len(set(r1)) == 5
    scores = rank_scores([7, 3, 9])
    assert sorted(scores, key=scores.get, reverse=True) == [7, 3, 9] and max(scores.values()) == 1.0
    with pytest.raises(ValueError, match="choose one of"):
        make_policy("best")


def two_categories(rng, n=20):
    """Categories a and b, each n candidates scored alike (0.95 down), at distinct embeddings."""
    return [Candidate(base + i, 0.95 - 0.02 * i, rng.normal(0, 1, 8), cat)
            for base, cat in ((0, "a"), (100, "b")) for i in range(n)]


def test_adaptive_policy_follows_the_yield():
    rng = np.random.default_rng(0)
    c = two_categories(rng)
    first = Adaptive().select(c, 10)
    assert first == make_policy("per-category").select(c, 10)  # no labels, scores alike: category turns
    # a's top picks were defects, b's came back normal: the budget moves to a
    labeled = [Labeled("a", 0.97, True)] * 5 + [Labeled("b", 0.97, False)] * 5
    rest = [x for x in c if x.task_id % 100 >= 5]
    picks = Adaptive().select(rest, 10, labeled)
    assert len(picks) == len(set(picks)) == 10 and 1 <= sum(t >= 100 for t in picks) <= 3
    assert sum(t >= 100 for t in make_policy("per-category").select(rest, 10)) == 5
    # a category near chance: its defects score like its normals, under the threshold; fewer turns
    noise = [Candidate(200 + i, 0.30 + 0.01 * i, rng.normal(0, 1, 8), "noise") for i in range(20)]
    picks = Adaptive().select(c[:20] + noise, 10)
    assert 1 <= sum(t >= 200 for t in picks) <= 3
    assert sum(t >= 200 for t in make_policy("per-category").select(c[:20] + noise, 10)) == 5


def test_adaptive_policy_passes_over_near_duplicates_and_asks_at_the_border():
    rng = np.random.default_rng(1)
    c = two_categories(rng)
    copies = [Candidate(50 + i, 0.99 - 0.001 * i, c[0].embedding + rng.normal(0, 1e-3, 8), "a") for i in range(5)]
    picks = Adaptive(explore=0).select(copies + c, 6)
    assert sum(t in range(50, 55) for t in picks) + (0 in picks) == 1, picks  # one of the six copies
    assert make_policy("top").select(copies + c, 6)[:5] == [50, 51, 52, 53, 54]
    # labels of both kinds in b: its threshold matters, so one pick sits where its odds are even
    labeled = [Labeled("b", 0.9, True), Labeled("b", 0.8, False), Labeled("b", 0.7, False)]
    odds = CategoryOdds()
    fitted = odds.fit(labeled)
    even = min((x for x in c if x.category == "b"), key=lambda x: abs(odds.odds(fitted, "b", x.score) - 0.5))
    picks = Adaptive(explore=0).select(c, 10, labeled)
    assert picks[-1] == even.task_id and sum(t >= 100 for t in picks[:-1]) < 5


def test_category_odds():
    odds = CategoryOdds()
    assert odds.odds({}, "x", 0.5) < 0.5 < odds.odds({}, "x", 0.9) and odds.odds({}, "x", 0.9) > odds.odds({}, "x", 0.6)
    fitted = odds.fit([Labeled("x", 0.9, False)] * 4 + [Labeled("y", 0.6, True)] * 4)
    assert odds.odds(fitted, "x", 0.9) < 0.5 < odds.odds(fitted, "y", 0.6)
    assert odds.odds(fitted, "z", 0.9) == odds.odds({}, "z", 0.9)  # no labels: the prior


def annotation(ann_id, task, mask=None, choice=None, labels=("scratch",)):
    result = []
    if mask is not None:
        h, w = mask.shape
        result.append({"type": "brushlabels", "from_name": "defect", "to_name": "image", "original_width": w,
                       "original_height": h, "value": {"format": "rle", "rle": BrushRLE().encode(mask),
                                                       "brushlabels": list(labels)}})
    if choice:
        result.append({"type": "choices", "from_name": "verdict", "to_name": "image", "value": {"choices": [choice]}})
    return {"id": ann_id, "task": task["id"], "result": result}


@pytest.fixture()
def feedback(served_registry, tiny_data, tmp_path):
    split = load_split(tiny_data)
    sample = next(s for s in split.test if s.label == 1 and s.mask_path)
    task = {"id": 11, "data": {"image": str(sample.path), "category": sample.category}}
    model = Registry(served_registry).load()
    fb = Feedback(model, tmp_path / "ledger.json", lambda v: load_image(v.image))
    return fb, task, sample


def test_masks_become_bank_entries_idempotently(feedback, tiny_data, tmp_path):
    fb, task, sample = feedback
    from defectloop.data import load_mask

    mask = load_mask(sample.mask_path)
    bank = fb.model.abnormal_bank
    before = len(bank)
    v = read_annotation(annotation(5, task, mask), task, CONFIG)
    assert v.kind == "mask" and v.defects == ["scratch"] and v.mask.sum() == mask.sum()
    assert fb.apply(v)
    added = len(bank) - before
    assert added > 0
    fb.apply(read_annotation(annotation(5, task, mask), task, CONFIG))  # delivered twice
    assert len(bank) - before == added
    smaller = np.zeros_like(mask)
    ys, xs = np.nonzero(mask)
    smaller[ys.min():ys.min() + 16, xs.min():xs.min() + 16] = True
    edited = read_annotation(annotation(5, task, smaller), task, CONFIG)
    assert decode_cells(fb.ledger["5"]["mask_cells"]).sum() > 16  # the ledger keeps the mask, coarsely
    fb.apply(edited)  # edited: replaced by the new mask's entries, not added to the old ones
    held = len(bank) - before
    assert held == fb.model.confirm(Provenance("probe", "probe"), load_image(sample.path), smaller) > 0
    assert fb.model.forget("probe") and len(bank) - before == held
    fb.apply(Verdict("5", 11, task["data"]["image"], sample.category, "deleted"))
    assert len(bank) == before and "ls:5" not in bank
    assert Feedback(fb.model, tmp_path / "ledger.json", fb.load_image).ledger == {}


def test_a_confirmed_mask_is_kept_as_cells():
    """The ledger keeps each confirmed mask on a fixed grid of cells (for the mask edges), whatever
    the image's size: a cell is defective where any pixel of it is, so a 1 px crack still shows."""
    mask = np.zeros((1000, 3000), bool)
    mask[500, 100:2900] = True  # a 1 px crack across a wide image
    mask[100:300, 200:500] = True
    cells = decode_cells(encode_cells(mask))
    assert cells.shape == (MASK_CELLS, MASK_CELLS) and len(encode_cells(mask)) < 3000
    assert cells[64, 5:123].all() and cells[64].sum() <= 120  # the crack: one row of cells
    assert cells[13:38, 8:22].all() and not cells[40:60].any() and not cells[:, 125:].any()


def test_image_level_verdicts_go_to_the_ledger(feedback, tmp_path):
    """A normal verdict is normal evidence for its image until any verdict on it says otherwise; an
    anomalous verdict without a mask adds the image's most anomalous patches as weak positives."""
    fb, task, _ = feedback
    bank = fb.model.abnormal_bank
    before = len(bank)
    evidence = fb.model.normal_evidence
    assert fb.apply(read_annotation(annotation(6, task, choice="normal"), task, CONFIG))
    assert f"normal:{task['data']['image']}" in evidence and len(evidence) > 0
    assert not fb.apply(read_annotation(annotation(6, task, choice="normal"), task, CONFIG))  # delivered twice
    assert fb.apply(read_annotation(annotation(7, task, choice="anomalous"), task, CONFIG))  # disputed: no evidence
    cells = (fb.model.config.image_size // 8) ** 2
    weak = [p for p in bank.annotations if p.annotation_id == "ls:7"]
    assert len(evidence) == 0 and len(bank) == before + max(1, round(0.01 * cells))
    assert weak[0].source == "weak" and weak[0] in [p for p, _ in fb.model.confirmed()]  # the retraining's too
    assert not fb.apply(read_annotation(annotation(7, task, choice="anomalous"), task, CONFIG))  # delivered twice
    assert fb.apply(Verdict("7", 11, "", "", "deleted")) and len(evidence) > 0  # the dispute withdrawn
    assert len(bank) == before
    fb.apply(read_annotation(annotation(7, task, choice="anomalous"), task, CONFIG))
    ledger = Feedback(fb.model, tmp_path / "ledger.json", fb.load_image).ledger  # persisted
    assert {k: v["kind"] for k, v in ledger.items()} == {"6": "normal", "7": "anomalous"}
    cancelled = read_annotation({**annotation(8, task, choice="normal"), "was_cancelled": True}, task, CONFIG)
    assert cancelled.kind == "empty"


def test_images_confirmed_normal_reach_the_retraining(feedback, tiny_data, tmp_path, caplog):
    """Normal verdicts become normal training samples of the next retraining, through the registry;
    defective ones held back judge its head."""
    from defectloop.workers.retrain import confirmed_images

    fb, _, _ = feedback
    fb.load_image = lambda v: load_image(v.source)
    goods = [s for s in load_split(tiny_data).test if s.label == 0][:3]
    tasks = [{"id": 20 + i, "data": {"image": f"/data/local-files/?d={i}", "category": s.category, "source": str(s.path)}}
             for i, s in enumerate(goods)]
    fb.apply(read_annotation(annotation(30, tasks[0], choice="normal"), tasks[0], CONFIG))
    fb.apply(read_annotation(annotation(31, tasks[0], choice="normal"), tasks[0], CONFIG))  # a second annotator
    fb.apply(read_annotation(annotation(32, tasks[1], choice="normal"), tasks[1], CONFIG))
    fb.apply(read_annotation(annotation(33, tasks[1], choice="anomalous"), tasks[1], CONFIG))  # disputed: left out
    fb.apply(read_annotation(annotation(34, tasks[2], choice="normal"), tasks[2], CONFIG))
    assert fb.labeled_images()["normal"] == sorted([{"source": str(s.path), "category": s.category,
                                                     "image": t["data"]["image"]}
                                                    for s, t in ((goods[0], tasks[0]), (goods[2], tasks[2]))],
                                                   key=lambda e: e["source"])
    assert fb.labeled_images()["defective"] == []  # the disputed image is neither
    reg = Registry(tmp_path / "reg")
    assert reg.labels("normal") == [] and confirmed_images(reg) == ([], [])
    reg.publish_labels({"normal": fb.labeled_images()["normal"] + [{"source": str(tmp_path / "gone.png"), "category": "tile"}],
                        "defective": [{"source": str(goods[1].path), "category": goods[1].category, "image": "x"}]})
    samples, held = confirmed_images(reg)
    assert held == []
    assert {(s.path, s.category, s.label) for s in samples} == {(s.path, s.category, 0) for s in (goods[0], goods[2])}
    # a share held back to judge the retraining is kept apart (calibrated on, not trained on)
    train, held = confirmed_images(reg, hold_back=0.5)
    assert sorted(s.path for s in train + held) == sorted(s.path for s in samples)
    assert all(held_back(next(e["image"] for e in reg.labels("normal") if e["source"] == str(s.path)), 0.5) for s in held)
    (defect,), _ = confirmed_images(reg, "defective")
    assert (defect.path, defect.label, defect.mask_path) == (goods[1].path, 1, None)
    assert "gone.png" in caplog.text and "skipping" in caplog.text


def test_mask_of_the_wrong_size_is_refused(feedback):
    fb, task, _ = feedback
    v = read_annotation(annotation(9, task, np.ones((7, 9), bool)), task, CONFIG)
    with pytest.raises(ValueError, match="mask size differs"):
        fb.apply(v)
    assert "ls:9" not in fb.model.abnormal_bank


def test_a_model_without_abnormal_memory_keeps_the_label_only(feedback, tiny_features, small_config, tmp_path):
    """PatchCore reads no abnormal bank: a confirmed mask is a label in the ledger, not a bank change."""
    from defectloop.data import load_mask
    from defectloop.models import AbnormalMemory, Fitter, create_model

    _, task, sample = feedback
    model = create_model(small_config("patchcore"))
    Fitter(model).fit(tiny_features(2)[0])
    assert not isinstance(model, AbnormalMemory) and not hasattr(model, "abnormal_bank")
    fb = Feedback(model, tmp_path / "pc-ledger.json", lambda v: load_image(v.image))
    assert not fb.apply(read_annotation(annotation(40, task, load_mask(sample.mask_path)), task, CONFIG))
    assert fb.ledger["40"]["kind"] == "mask"

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from defectloop.metrics import aupro, auroc, average_precision, evaluate, f1_max


def test_against_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = y + rng.normal(0, 1, 300)
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s))
    assert average_precision(s, y) == pytest.approx(average_precision_score(y, s))
    f1, thr = f1_max(s, y)
    pred = s >= thr
    tp = (pred & (y == 1)).sum()
    assert f1 == pytest.approx(2 * tp / (pred.sum() + y.sum()))
    assert auroc(s, np.zeros(300)) is None


def test_aupro_hand_computed():
    # one image, 1 x 4 pixels: two normal pixels (scores 0.1 and 0.3), one region of two pixels
    # (scores 0.4 and 0.2). Thresholds high->low: 0.4: fpr 0, pro 0.5; 0.3: fpr 0.5, pro 0.5;
    # 0.2: fpr 0.5, pro 1.0; 0.1: fpr 1, pro 1. Up to fpr 0.3 the curve is flat at pro 0.5 from
    # fpr 0 ... but the step from (0, 0.5) to (0.5, 0.5) is linear, so area = 0.3 * 0.5 = 0.15,
    # normalised by 0.3 -> 0.5.
    maps = np.array([[[0.1, 0.3, 0.4, 0.2]]])
    masks = np.array([[[0, 0, 1, 1]]], bool)
    assert aupro(maps, masks) == pytest.approx(0.5)
    # perfect separation -> 1.0; region scored below every normal pixel -> 0.0
    assert aupro(np.array([[[0.0, 0.0, 1.0, 1.0]]]), masks) == pytest.approx(1.0)
    assert aupro(np.array([[[1.0, 1.0, 0.0, 0.0]]]), masks, fpr_limit=0.3) == pytest.approx(0.0)


def test_aupro_averages_regions_not_pixels():
    # two regions: a big one found at once, a small one never found before fpr 0.3
    maps = np.zeros((1, 10, 10))
    masks = np.zeros((1, 10, 10), bool)
    masks[0, :4, :4] = True  # 16 px region, top score
    masks[0, 9, 9] = True  # 1 px region, lowest score
    maps[0, :4, :4] = 1.0
    maps[0, 9, 9] = -1.0
    maps[0][~masks[0]] = np.linspace(0, 0.5, (~masks[0]).sum())
    assert aupro(maps, masks) == pytest.approx(0.5, abs=1e-6)


def test_evaluate_shape_and_null_pixel_metrics():
    cats = ["a"] * 4 + ["b"] * 4
    labels = np.array([0, 0, 1, 1, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.8, 0.9, 0.1, 0.5, 0.4, 0.9])
    maps = np.random.default_rng(0).random((8, 4, 4))
    m = np.zeros((4, 4), bool)
    m[1:3, 1:3] = True
    masks = [np.zeros((4, 4), bool)] * 2 + [m, m] + [np.zeros((4, 4), bool)] * 2 + [None, None]
    res = evaluate(cats, scores, labels, maps, masks)
    assert res["categories"]["a"]["image_auroc"] == 1.0
    assert res["categories"]["a"]["pixel_auroc"] is not None
    assert res["categories"]["b"]["pixel_auroc"] is None and res["categories"]["b"]["aupro"] is None
    assert res["mean"]["image_auroc"] == pytest.approx((1.0 + 0.75) / 2)
    assert set(res["mean"]) == {"image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap", "f1_max", "mask_iou",
                                "n_test"}
    assert res["mean"]["mask_iou"] is None  # no IoUs given


def test_mask_iou_of_the_mask_a_user_is_shown(tmp_path):
    """The IoU is taken at the ground truth's own size, of the served mask: the prediction's map
    (at the model's size) brought to the mask's size and cut at the pixel threshold; an image
    called normal shows no mask (IoU 0 with its defect); a normal image or one without a mask has
    none. Per category, the mean over defective images."""
    from PIL import Image

    from defectloop.data.mvtec import Sample
    from defectloop.metrics import mask_iou, served_mask_ious
    from defectloop.models import Prediction

    assert mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
    truth = np.zeros((64, 64), bool)
    truth[16:32, 16:48] = True  # 16 x 32 at the image's size
    Image.fromarray(truth.astype(np.uint8) * 255).save(tmp_path / "m.png")
    amap = np.zeros((16, 16), np.float32)
    amap[4:8, 4:8] = 1.0  # 16 x 16 at the image's size: half the defect, nothing outside it

    def shown(decision: str) -> Prediction:
        return Prediction(score=1.0, normalised_score=0.9, threshold=0.5, pixel_threshold=0.5, decision=decision,
                          category="a", known_category=True, amap=amap)

    samples = [Sample(tmp_path / "x.png", "a", 1, "crack", tmp_path / "m.png"),
               Sample(tmp_path / "y.png", "a", 1, "crack", tmp_path / "m.png"),
               Sample(tmp_path / "z.png", "a", 0, "good", None), Sample(tmp_path / "w.png", "a", 1, "crack", None)]
    ious = served_mask_ious([shown("anomalous"), shown("normal"), shown("anomalous"), shown("anomalous")], samples)
    assert ious[0] == pytest.approx(0.5, abs=0.05) and ious[1] == 0.0 and ious[2:] == [None, None]
    res = evaluate(["a"] * 4, np.array([0.9, 0.8, 0.1, 0.7]), np.array([1, 1, 0, 1]), ious=ious)
    assert res["categories"]["a"]["mask_iou"] == pytest.approx(ious[0] / 2)

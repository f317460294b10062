"""Anomaly-detection metrics: image/pixel AUROC, AUPRO, image/pixel AP, F1-max, mask IoU; per
category and mean.

AUROC and AP come from scikit-learn; AUPRO follows the MVTec AD definition (per-region overlap
averaged over connected ground-truth regions, integrated over the pixel FPR up to 0.3 and
normalised by 0.3) with an exact sort-based sweep over all thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from defectloop.data import load_mask
from defectloop.data.mvtec import Sample

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap", "f1_max", "mask_iou")


class MaskPrediction(Protocol):
    """What the mask metric needs of a prediction (models.Prediction)."""

    def mask(self, width: int, height: int) -> np.ndarray: ...


def _both_classes(labels: np.ndarray) -> bool:
    return labels.size > 0 and 0 < labels.sum() < labels.size


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """ROC AUC; None when only one class is present (undefined)."""
    labels = np.asarray(labels).ravel().astype(bool)
    return float(roc_auc_score(labels, np.asarray(scores).ravel())) if _both_classes(labels) else None


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float | None:
    labels = np.asarray(labels).ravel().astype(bool)
    return float(average_precision_score(labels, np.asarray(scores).ravel())) if _both_classes(labels) else None


def f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float | None, float | None]:
    """Best F1 over all thresholds, and the threshold that reaches it."""
    labels = np.asarray(labels).ravel().astype(bool)
    if not _both_classes(labels):
        return None, None
    precision, recall, thresholds = precision_recall_curve(labels, np.asarray(scores).ravel())
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return float(f1[best]), float(thresholds[best]) if len(thresholds) else None


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float | None:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit``.

    ``maps``: N x H x W anomaly scores; ``masks``: N x H x W bool ground truth. Regions are the
    8-connected components of each mask. None when there is no region or no normal pixel.
    """
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks).astype(bool)
    region_ids = np.zeros(masks.shape, dtype=np.int64)
    n_regions = 0
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3), dtype=int))
        region_ids[i] = np.where(lab > 0, lab + n_regions, 0)
        n_regions += n
    n_normal = int((~masks).sum())
    if n_regions == 0 or n_normal == 0:
        return None
    region_sizes = np.bincount(region_ids.ravel(), minlength=n_regions + 1).astype(np.float64)
    scores = maps.ravel()
    ids = region_ids.ravel()
    order = np.argsort(-scores, kind="stable")
    scores, ids = scores[order], ids[order]
    # walking thresholds from high to low: each pixel adds to FPR (normal) or to its region's overlap
    fpr_step = np.where(ids == 0, 1.0 / n_normal, 0.0)
    pro_step = np.where(ids > 0, 1.0 / (region_sizes[ids] * n_regions), 0.0)
    fpr = np.cumsum(fpr_step)
    pro = np.cumsum(pro_step)
    # a threshold admits all pixels of equal score at once: keep the last index of each tie group
    last = np.r_[scores[1:] != scores[:-1], True]
    fpr = np.r_[0.0, fpr[last]]
    pro = np.r_[0.0, pro[last]]
    if fpr[-1] < fpr_limit:  # curve never reaches the limit (cannot happen with all pixels admitted)
        fpr_limit = fpr[-1]
    cut = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:cut], pro[:cut]
    if cut < len(fpr) and x[-1] < fpr_limit:
        x0, x1, y0, y1 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x, y = np.r_[x, fpr_limit], np.r_[y, y_lim]
    return float(np.trapezoid(y, x) / fpr_limit)


def mask_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two bool masks of one image (1.0 when both are empty)."""
    union = np.logical_or(predicted, truth).sum()
    return float(np.logical_and(predicted, truth).sum() / union) if union else 1.0


def category_metrics(image_scores: np.ndarray, image_labels: np.ndarray, maps: np.ndarray | None = None,
                     masks: np.ndarray | None = None, ious: Sequence[float] = ()) -> dict[str, float | None]:
    """All metrics for one category; pixel metrics are None without masks, ``mask_iou`` (the mean
    of ``ious``, one per defective image with a mask) None without any."""
    image_scores = np.asarray(image_scores, dtype=np.float64)
    image_labels = np.asarray(image_labels).astype(int)
    out: dict[str, float | None] = {
        "image_auroc": auroc(image_scores, image_labels),
        "image_ap": average_precision(image_scores, image_labels),
        "f1_max": f1_max(image_scores, image_labels)[0],
        "pixel_auroc": None, "pixel_ap": None, "aupro": None,
        "mask_iou": float(np.mean(ious)) if len(ious) else None,
    }
    if maps is not None and masks is not None and masks.any():
        out["pixel_auroc"] = auroc(maps, masks)
        out["pixel_ap"] = average_precision(maps, masks)
        out["aupro"] = aupro(maps, masks)
    return out


def mean_metrics(per_category: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    """Unweighted mean over categories of each metric, ignoring categories where it is undefined."""
    mean: dict[str, float | None] = {}
    for key in METRIC_KEYS:
        vals = [m[key] for m in per_category.values() if m.get(key) is not None]
        mean[key] = float(np.mean(vals)) if vals else None
    return mean


def evaluate(categories: Sequence[str], image_scores: np.ndarray, image_labels: np.ndarray,
             maps: Sequence[np.ndarray] | None = None, masks: Sequence[np.ndarray | None] | None = None,
             ious: Sequence[float | None] | None = None) -> dict:
    """Per-category and mean metrics in the `defectloop evaluate` JSON shape.

    ``maps[i]``: image i's anomaly map (the images of one category share a size; categories seen
    as tiles of different counts do not).

    ``masks[i]`` is None for an anomalous image without a pixel mask; a category with any such
    image gets null pixel metrics (its pixel ground truth is incomplete). ``ious[i]``: the IoU of
    image i's predicted mask with its defect's (see ``served_mask_ious``), None where it has none.
    """
    categories = np.asarray(categories)
    result: dict[str, dict] = {"categories": {}}
    for cat in sorted(set(categories.tolist())):
        idx = np.flatnonzero(categories == cat)
        labels = np.asarray(image_labels)[idx]
        cat_maps = cat_masks = None
        if maps is not None and masks is not None:
            have = [masks[i] is not None or labels[j] == 0 for j, i in enumerate(idx)]
            if all(have) and labels.any():
                cat_maps = np.stack([maps[i] for i in idx])
                cat_masks = np.stack([masks[i] if masks[i] is not None else np.zeros(cat_maps.shape[1:], bool)
                                      for i in idx])
        cat_ious = [ious[i] for i in idx if ious[i] is not None] if ious is not None else []
        m = category_metrics(np.asarray(image_scores)[idx], labels, cat_maps, cat_masks, cat_ious)
        m["n_test"] = int(len(idx))
        result["categories"][cat] = m
    result["mean"] = mean_metrics(result["categories"])
    result["mean"]["n_test"] = int(len(categories))
    return result


def served_mask_ious(predictions: Sequence[MaskPrediction], samples: Sequence[Sample]) -> list[float | None]:
    """Per image, the IoU of the mask a user is shown (``Prediction.mask``: the served decision and
    pixel threshold, at the image's own size) with its ground-truth mask; None for an image without
    one. Compared at the ground truth's size, so models of different input sizes are judged alike:
    a thin crack that a 256 px mask at 2 px per cell would not even show is still counted."""
    out: list[float | None] = []
    for p, s in zip(predictions, samples, strict=True):
        if not s.label or s.mask_path is None:
            out.append(None)
            continue
        truth = load_mask(s.mask_path)
        out.append(mask_iou(p.mask(truth.shape[1], truth.shape[0]), truth))
    return out


def fmt(value: float | None) -> str:
    """Table formatting: a metric as a percentage with one decimal, '-' when undefined."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"

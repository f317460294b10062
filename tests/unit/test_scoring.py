"""The served model: registry pointers, bank updates, swapping, predicted masks and heatmaps."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defectloop.memory import Provenance
from defectloop.registry import Registry
from defectloop.scoring import ModelHandle


@pytest.fixture()
def registry(served_copy):
    return Registry(served_copy)


@pytest.fixture(scope="module")
def test_images(tiny_data):
    from defectloop.data import load_image, load_split
    from defectloop.features import image_tensor

    split = load_split(tiny_data, anomalies_per_class=2)
    return [(s, image_tensor(load_image(s.path), 128)) for s in split.test]


def test_handle_follows_versions_and_bank_updates(registry, test_images):
    handle = ModelHandle(registry.location)
    assert handle.served.label == "v0001"
    assert not handle.refresh()
    sample, img = next((s, t) for s, t in test_images if s.label == 0)
    before = handle.score([img], [sample.category])[0].prediction.score

    # an annotator confirms a defect that looks like this image: a new bank update, served at once
    model = registry.load()
    feats = model.embedder(img[None])[0].flatten(1).T
    model.abnormal_bank.add(Provenance("ann-1", sample.image_id, sample.category, "scratch"), feats)
    assert registry.publish_bank(model) == "v0001-b0001"
    old = handle.served
    assert handle.refresh() and handle.served.label == "v0001-b0001"
    after = handle.score([img], [sample.category])[0].prediction.score
    assert after > before  # nearer a confirmed defect now
    assert old.model.abnormal_bank is not handle.served.model.abnormal_bank  # the old model was left intact

    # then annotators confirm it normal after all: its patches are normal evidence in the next update
    model.forget("ann-1")
    model.normal_evidence.add(Provenance("normal:it", sample.image_id, sample.category, "good"), feats)
    assert registry.publish_bank(model) == "v0001-b0002"
    assert handle.refresh() and len(handle.served.model.normal_evidence) == len(feats)
    assert handle.score([img], [sample.category])[0].prediction.score < before
    assert len(old.model.normal_evidence) == 0

    v2 = registry.register(registry.load("v0001"))
    assert handle.refresh() and handle.served.label == v2
    registry.rollback()
    assert handle.refresh() and handle.served.label == "v0001-b0002"


def test_a_bank_update_carries_its_thresholds(registry, test_images):
    """Thresholds raised over confirmed normals travel with the bank update they were set under; the
    version keeps its own."""
    handle = ModelHandle(registry.location)
    sample, img = next((s, t) for s, t in test_images if s.label == 0)
    model = registry.load()
    fitted = model.calibration
    raised = model.calibration = fitted.shifted(100.0)
    assert registry.publish_bank(model) == "v0001-b0001"
    assert handle.refresh() and handle.served.model.calibration == raised
    assert handle.score([img], [sample.category])[0].prediction.threshold == raised.threshold(sample.category)
    assert registry.load().calibration == raised and registry.calibration() == fitted  # the version's own is kept
    model.calibration = fitted
    assert registry.publish_bank(model) == "v0001-b0002"
    assert handle.refresh() and handle.served.model.calibration == fitted


def test_handle_keeps_serving_when_a_new_version_is_broken(registry, caplog):
    handle = ModelHandle(registry.location)
    assert handle.served.label == "v0001"
    v2 = registry.register(registry.load())
    (registry.path(v2) / "weights.safetensors").write_bytes(b"garbage")
    assert not handle.refresh()
    assert handle.served.label == "v0001" and "v0002" not in handle.served.label
    assert handle.last_error and "keeping v0001" in caplog.text


def test_pinned_version_and_plain_directory(registry):
    v2 = registry.register(registry.load())
    assert ModelHandle(registry.location, version="v0001").served.label == "v0001"
    assert ModelHandle(registry.path(v2)).served.label == v2
    with pytest.raises(FileNotFoundError):
        _ = ModelHandle(Path(registry.location) / "nowhere").served


def test_mask_and_heatmap_at_image_size(registry, test_images):
    handle = ModelHandle(registry.location)
    model = handle.served.model
    bad = [(s, t) for s, t in test_images if s.label == 1]
    good = [(s, t) for s, t in test_images if s.label == 0]
    scored = [r.prediction for r in handle.score([t for _, t in bad + good], [s.category for s, _ in bad + good])]
    for (s, _), p in zip(bad + good, scored, strict=True):
        assert p.mask(200, 150).shape == (150, 200)
        assert p.pixel_threshold == model.calibration.pixel_threshold(s.category)
        assert p.decision == ("anomalous" if p.score > p.threshold else "normal")
    hits = [p.mask(128, 128).any() for p in scored]
    assert np.mean(hits[:len(bad)]) > np.mean(hits[len(bad):])
    png = Image.open(io.BytesIO(scored[0].heatmap_png(200, 150)))
    assert png.size == (200, 150) and png.mode == "P"  # a jet palette over the map: a byte a pixel
    p = scored[0]
    hot = np.unravel_index(np.argmax(p.amap), p.amap.shape)
    rgb = np.asarray(Image.open(io.BytesIO(p.heatmap_png(*p.amap.shape[::-1]))).convert("RGB"))
    assert rgb[hot][0] >= rgb[hot][2] if p.amap.max() > p.pixel_threshold else rgb[hot][2] >= rgb[hot][0]  # red above, blue below
    for q in scored:  # the mask cut at the image size agrees with cutting the float map resized there,
        # but within a byte's step (1/127 of the map's range around the threshold) of the threshold
        float_map = np.asarray(Image.fromarray(q.amap.astype(np.float32), mode="F").resize((300, 170), Image.BILINEAR))
        exact = float_map > q.pixel_threshold if q.decision == "anomalous" else np.zeros((170, 300), bool)
        step = np.abs(q.amap - q.pixel_threshold).max() / 127
        differ = q.mask(300, 170) != exact
        assert not (differ & (np.abs(float_map - q.pixel_threshold) > 1.5 * step)).any() and differ.mean() < 0.02


def test_normalised_scores_put_the_threshold_at_half(registry):
    cal = registry.load().calibration
    for cat in ("tile", "disc", None):
        t = cal.threshold(cat)
        assert cal.normalise(t, cat) == pytest.approx(0.5)
        assert cal.normalise(t * 0.5, cat) < 0.5 < cal.normalise(t * 2, cat) < 1.0
        # far above the threshold, scores stay apart at 3 decimals (a ranked tab of "1.000"s shows nothing)
        far = [round(cal.normalise(t + k * cal.get(cat).normal_std, cat), 3) for k in (20, 40, 80)]
        assert far == sorted(set(far)) and far[-1] < 1.0
    assert all(e.pixel_threshold > 0 for e in cal.entries.values())


def test_score_is_one_batch(registry, test_images):
    handle = ModelHandle(registry.location)
    imgs = [t for _, t in test_images[:5]]
    batch = [r.prediction.score for r in handle.score(imgs, [None] * len(imgs))]
    single = [handle.score([t], [None])[0].prediction.score for t in imgs]
    assert batch == pytest.approx(single, abs=1e-4)
    assert torch.is_tensor(imgs[0])

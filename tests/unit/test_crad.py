"""CRAD on generated images: it learns, it separates a synthetic defect, it round-trips, ablations run."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from defectloop.data import load_split
from defectloop.features import extract
from defectloop.metrics import auroc
from defectloop.models import create_model, load_model
from defectloop.models.crad import CRADHead, bilinear_weights


@pytest.fixture(scope="module")
def features(tiny_features):
    return tiny_features(0)


@pytest.fixture(scope="module")
def crad(features):
    from defectloop.models import ModelConfig

    model = create_model(ModelConfig(kind="crad", image_size=128, crad_epochs=12, crad_batch_size=8, crad_layers=2))
    stats = model.fit(features[0])
    return model, stats


def test_bilinear_weights_match_grid_sample():
    grid = torch.randn(1, 5, 8, 8)
    coord = torch.rand(200, 2) * 2.4 - 1.2  # also outside [-1, 1]: zero padding
    ref = F.grid_sample(grid, coord[None, :, None, :], mode="bilinear", align_corners=False)[0, :, :, 0].T
    assert torch.allclose(bilinear_weights(coord, 8) @ grid.flatten(2)[0].T, ref, atol=1e-6)


def test_sizes_follow_backbone_and_grid():
    head = CRADHead(168, (16, 12), local_res=8, global_res=4)
    assert head.local_grid.shape == (1, 168, 8, 8)
    assert head.global_grid.shape == (1, 168 * 16 * 12, 4, 4)
    x = torch.randn(2, 168, 16, 12)
    assert head(x).shape == x.shape
    assert not hasattr(CRADHead(168, (16, 12), use_global=False), "global_grid")


def test_crad_learns_and_separates_defects(crad, features):
    model, stats = crad
    history = stats["crad_history"]
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert stats["crad_best_val_loss"] == min(h["val_loss"] for h in history)
    _, test = features
    scores, maps = model.score_features(test.features)
    labels = np.array([s.label for s in test.samples])
    assert auroc(scores.numpy(), labels) > 0.85
    masks = torch.stack(test.masks)
    assert auroc(maps.numpy(), (masks > 0.5).numpy()) > 0.85


def test_crad_save_load_bit_exact(crad, features, tmp_path):
    model, _ = crad
    model.save(tmp_path / "v")
    assert not (tmp_path / "v" / "normal_bank.safetensors").exists()
    loaded = load_model(tmp_path / "v")
    a, ma = model.score_features(features[1].features)
    b, mb = loaded.score_features(features[1].features)
    assert torch.equal(a, b) and torch.equal(ma, mb)


def test_warm_fit_continues_from_the_learned_head(crad, features, tmp_path):
    """A warm refit (the retraining's default) starts where the served head ended, statistics kept."""
    model, stats = crad
    model.save(tmp_path / "v")
    warm = load_model(tmp_path / "v")
    warm.config.crad_epochs = 2
    kept = {k: warm.head_state()[k].clone() for k in ("head.mean", "head.std")}
    history = warm.fit(features[0], warm=True)["crad_history"]
    assert history[0]["train_loss"] < 0.5 * stats["crad_history"][0]["train_loss"]
    assert all(torch.equal(warm.head_state()[k], v) for k, v in kept.items())


@pytest.mark.parametrize(("switch", "value"), [("crad_global", False), ("crad_refine", True)])
def test_ablations_switch_parts(features, switch, value):
    from defectloop.models import ModelConfig

    model = create_model(ModelConfig(kind="crad", image_size=128, crad_epochs=2, crad_batch_size=8,
                                     crad_layers=1, **{switch: value}))
    model.fit(features[0])
    assert model.score_features(features[1].features[:2])[0].isfinite().all()


def test_disk_feature_cache_equals_ram(tiny_data, embedder, features, tmp_path):
    """Features too big for the memory budget go to an (unlinked) memory-mapped file, same values."""
    split = load_split(tiny_data, anomalies_per_class=0)
    on_disk = extract(embedder, split.train[:10], 128, max_memory=0, cache_dir=str(tmp_path))
    assert torch.equal(on_disk.features, features[0].features[:10])
    assert list(tmp_path.iterdir()) == []  # the file is unlinked at once

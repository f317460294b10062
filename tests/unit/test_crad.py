"""CRAD on generated images: it learns, it separates a synthetic defect, it round-trips, ablations run."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from defectloop.data import load_split
from defectloop.features import extract
from defectloop.metrics import auroc
from defectloop.models import AbnormalMemory, Fitter, create_model, load_model
from defectloop.models.crad import ClusterStats, CRADHead, bilinear_weights, cluster_images


@pytest.fixture(scope="module")
def features(tiny_features):
    return tiny_features(0)


@pytest.fixture(scope="module")
def crad(features, small_config):
    model = create_model(small_config("crad", crad={"epochs": 12, "layers": 2}))
    stats = Fitter(model).fit(features[0])
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


def _blobs(centres: list[float], n: int = 40, dim: int = 6, spread: float = 0.3) -> torch.Tensor:
    """Feature maps (n per centre, dim x 4 x 4) scattered around well apart per-image means."""
    g = torch.Generator().manual_seed(0)
    offsets = torch.cat([c + spread * torch.randn(n, dim, generator=g) for c in centres])
    return offsets[:, :, None, None] + torch.randn(len(offsets), dim, 4, 4, generator=g)


def _moments(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return feats.mean((2, 3)), feats.pow(2).mean((2, 3))


def test_cluster_count_follows_the_data():
    """Separate groups of images get their own statistics; one group's spread is not split."""
    two = _moments(_blobs([0.0, 6.0]))[0].numpy()
    assert len(set(cluster_images(two, 0, 16, 0.5, 0))) == 2
    assert len(set(cluster_images(two, 1, 16, 0.5, 0))) == 1
    assert len(set(cluster_images(two, 3, 16, 0.5, 0))) == 3
    one = _moments(_blobs([0.0], n=80, spread=1.0))[0].numpy()
    assert len(set(cluster_images(one, 0, 16, 0.5, 0))) == 1


def test_cluster_stats_centre_and_scale_each_group():
    a, b = _blobs([0.0], spread=0.1), 3.0 * _blobs([10.0], spread=0.1)
    stats = ClusterStats(6)
    mean, sq = _moments(torch.cat([a, b]))
    stats.fit(mean, sq)
    assert stats.mean.shape == (2, 6)
    for group in (a, b):
        x = stats(group)
        assert x.mean().abs() < 0.1
        assert x.std((0, 2, 3)).pow(2).mean().sqrt() == pytest.approx(1.0, abs=0.1)
    assert not torch.equal(*stats.assign(torch.cat([a[:1], b[:1]])))
    loaded = ClusterStats(6)  # one cluster until loaded: the saved state sets the number
    loaded.load_state_dict(stats.state_dict())
    assert torch.equal(loaded(b), stats(b))


def test_versions_with_one_mean_and_std_still_load():
    """Model versions saved before per-cluster statistics kept one mean and std (C each) on the head."""
    head = CRADHead(6, (4, 4), local_res=4, global_res=2)
    mean, std = torch.randn(6), torch.rand(6) + 0.5
    state = {k: v for k, v in head.state_dict().items() if not k.startswith("stats.")}
    head.load_state_dict({**state, "mean": mean, "std": std})
    x = torch.randn(3, 6, 4, 4)
    assert torch.allclose(head.normalise(x), (x - mean[:, None, None]) / std[:, None, None])


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
    assert not (tmp_path / "v" / "abnormal_bank.safetensors").exists() and not isinstance(model, AbnormalMemory)
    loaded = load_model(tmp_path / "v")
    a, ma = model.score_features(features[1].features)
    b, mb = loaded.score_features(features[1].features)
    assert torch.equal(a, b) and torch.equal(ma, mb)


def test_warm_fit_continues_from_the_learned_head(crad, features, tmp_path):
    """A warm refit (the retraining's default) starts where the served head ended, statistics kept."""
    model, stats = crad
    model.save(tmp_path / "v")
    warm = load_model(tmp_path / "v")
    warm.config.crad.epochs = 2
    kept = {k: warm.head_state()[k].clone() for k in ("head.stats.mean", "head.stats.std")}
    history = Fitter(warm).fit(features[0], warm=True)["crad_history"]
    assert history[0]["train_loss"] < 0.5 * stats["crad_history"][0]["train_loss"]
    assert all(torch.equal(warm.head_state()[k], v) for k, v in kept.items())


@pytest.mark.parametrize(("switch", "value"), [("use_global", False), ("refine", True)])
def test_ablations_switch_parts(features, small_config, switch, value):
    model = create_model(small_config("crad", crad={"epochs": 2, "layers": 1, switch: value}))
    Fitter(model).fit(features[0])
    assert model.score_features(features[1].features[:2])[0].isfinite().all()


def test_disk_feature_cache_equals_ram(tiny_data, embedder, features, tmp_path):
    """Features too big for the memory budget go to an (unlinked) memory-mapped file, same values."""
    split = load_split(tiny_data, anomalies_per_class=0)
    on_disk = extract(embedder, split.train[:10], 128, max_memory=0, cache_dir=str(tmp_path))
    assert torch.equal(on_disk.features, features[0].features[:10])
    assert list(tmp_path.iterdir()) == []  # the file is unlinked at once

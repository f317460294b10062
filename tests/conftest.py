"""Shared fixtures: generated data sets (unit tests never use licensed images) and small configs."""

from __future__ import annotations

import pytest
import torch

from defectloop.data import load_split
from defectloop.data.synthetic import make_dataset
from defectloop.features import PatchEmbedder, extract, load_backbone
from defectloop.models import CRADConfig, DMADConfig, ModelConfig

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Three generated categories in MVTec layout, 128 px, with exact masks."""
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=16, n_test_good=5, n_test_bad=6, size=128, seed=1)


@pytest.fixture(scope="session")
def small_config():
    """Training sizes for tests: small image, small bank, few steps (``dmad``/``crad``: section settings)."""
    return small


def small(kind: str, dmad: dict | None = None, crad: dict | None = None, **kw) -> ModelConfig:
    """A test-sized config; ``dmad``/``crad`` override their sections' settings."""
    return ModelConfig(kind=kind, image_size=128, coreset_ratio=0.1, **kw,
                       dmad=DMADConfig(**{**dict(steps=120, warm_steps=30, batch_size=512, synthetic_per_category=2, train_patches=20_000),
                                          **(dmad or {})}),
                       crad=CRADConfig(**{**dict(epochs=12, batch_size=8), **(crad or {})}))


@pytest.fixture(scope="session")
def embedder():
    return PatchEmbedder(load_backbone("tf_efficientnet_lite0"))


@pytest.fixture(scope="session")
def tiny_features(tiny_data, embedder):
    """(train, test) features of ``tiny_data`` at 128 px with K seen anomalies per category, cached per K."""
    cache: dict[int, tuple] = {}

    def get(k: int):
        if k not in cache:
            split = load_split(tiny_data, anomalies_per_class=k)
            cache[k] = extract(embedder, split.train, 128), extract(embedder, split.test, 128)
        return cache[k]
    return get


@pytest.fixture(scope="session")
def served_registry(tiny_features, tmp_path_factory):
    """A registry holding one small DMAD version (2 seen anomalies per category), for scorer tests."""
    from defectloop.models import create_model
    from defectloop.registry import Registry

    train, _ = tiny_features(2)
    from defectloop.models import Fitter

    model = create_model(small("dmad"))
    Fitter(model).fit(train)
    root = tmp_path_factory.mktemp("registry")
    Registry(root).register(model)
    return root


@pytest.fixture()
def served_copy(served_registry, tmp_path):
    """A copy of ``served_registry`` that a test may change."""
    import shutil

    root = tmp_path / "reg"
    shutil.copytree(served_registry, root)
    return root


@pytest.fixture(scope="session")
def confirmed_defects():
    """Defects as annotators confirm them (one per category of ``extracted``): provenance, features under the mask."""
    from defectloop.features import mask_cells
    from defectloop.memory import Provenance

    def make(extracted, coverage: float) -> list:
        out, seen = [], set()
        for f, m, s in zip(extracted.features, extracted.masks, extracted.samples, strict=True):
            if s.label == 1 and m is not None and s.category not in seen:
                seen.add(s.category)
                out.append((Provenance(f"ls:{s.image_id}", s.image_id, s.category, s.defect), mask_cells(f, m, coverage)))
        return out
    return make

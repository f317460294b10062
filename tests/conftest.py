"""Shared fixtures: generated data sets (unit tests never use licensed images) and small configs."""

from __future__ import annotations

import pytest
import torch

from defectloop.data.synthetic import make_dataset
from defectloop.models import ModelConfig

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Three generated categories in MVTec layout, 128 px, with exact masks."""
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=16, n_test_good=5, n_test_bad=6, size=128, seed=1)


@pytest.fixture()
def small_config():
    """Training sizes for tests: small image, small bank, few steps."""
    def make(kind: str, **kw) -> ModelConfig:
        base = dict(kind=kind, image_size=128, coreset_ratio=0.1, steps=120, batch_size=512,
                    synthetic_per_category=2, train_patches=20_000)
        base.update(kw)
        return ModelConfig(**base)
    return make

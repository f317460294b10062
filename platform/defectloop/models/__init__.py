"""Anomaly models: PatchCore baseline, DMAD and CRAD, behind one interface (see base.AnomalyModel)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from defectloop.models.base import ANY_CATEGORY, AnomalyModel, ModelConfig
from defectloop.models.crad import CRAD
from defectloop.models.dmad import DMAD
from defectloop.models.patchcore import PatchCore

MODEL_TYPES: dict[str, type[AnomalyModel]] = {"patchcore": PatchCore, "dmad": DMAD, "crad": CRAD}


def create_model(config: ModelConfig) -> AnomalyModel:
    try:
        cls = MODEL_TYPES[config.kind]
    except KeyError as e:
        raise ValueError(f"unknown model type {config.kind!r}; choose one of {', '.join(MODEL_TYPES)}") from e
    # learned heads start from weights that depend on the config's seed alone: the same config and data
    # give the same model (initialised from the global RNG, the DMAD scorer varied by 5 points of AUROC)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return cls(config)


def load_model(folder: str | Path) -> AnomalyModel:
    """Load a saved model version directory."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"not a model version directory (no config.json): {folder}")
    model = create_model(ModelConfig.from_dict(json.loads((folder / "config.json").read_text())))
    model.load_state(folder)
    return model.eval()


__all__ = ["ANY_CATEGORY", "CRAD", "DMAD", "MODEL_TYPES", "AnomalyModel", "ModelConfig", "PatchCore", "create_model",
           "load_model"]

"""Anomaly models: PatchCore baseline, DMAD and CRAD, behind one interface.

The public face: ``create_model``/``load_model``, ``AnomalyModel.predict`` (one ``Prediction`` per
image), ``Calibration``, ``Fitter`` (training), and the ``AbnormalMemory`` capability
(``confirm``/``forget``) of models that score with an abnormal bank. Code outside ``models/``
imports from here, never from the modules inside.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from defectloop.memory import IndexFactory, build_index
from defectloop.models.abnormal_memory import AbnormalMemory, Confirmed
from defectloop.models.base import AnomalyModel
from defectloop.models.calibration import ANY_CATEGORY, Calibration
from defectloop.models.config import CRADConfig, DMADConfig, ModelConfig
from defectloop.models.crad import CRAD
from defectloop.models.dmad import DMAD
from defectloop.models.fitter import Fitter
from defectloop.models.head_choice import BANKS, HEAD, Choice, HeadChoices
from defectloop.models.holdout import held_back
from defectloop.models.patch_scores import PatchScores
from defectloop.models.patchcore import PatchCore
from defectloop.models.prediction import Prediction
from defectloop.models.tile_choice import choose_tiles, tiled

MODEL_TYPES: dict[str, type[AnomalyModel]] = {"patchcore": PatchCore, "dmad": DMAD, "crad": CRAD}


def create_model(config: ModelConfig, index: IndexFactory = build_index) -> AnomalyModel:
    """A new, unfitted model; ``index`` builds its banks' nearest-neighbour indexes (a strategy)."""
    try:
        cls = MODEL_TYPES[config.kind]
    except KeyError as e:
        raise ValueError(f"unknown model type {config.kind!r}; choose one of {', '.join(MODEL_TYPES)}") from e
    # learned heads start from weights that depend on the config's seed alone: the same config and data
    # give the same model (initialised from the global RNG, the DMAD scorer varied by 5 points of AUROC)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return cls(config, index)


def read_config(folder: str | Path) -> ModelConfig:
    """The config of a saved model version directory."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"not a model version directory (no config.json): {folder}")
    return ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))


def load_model(folder: str | Path, index: IndexFactory = build_index) -> AnomalyModel:
    """Load a saved model version directory."""
    model = create_model(read_config(folder), index)
    model.load_state(Path(folder))
    return model.eval()


__all__ = ["ANY_CATEGORY", "BANKS", "CRAD", "DMAD", "HEAD", "MODEL_TYPES", "AbnormalMemory", "AnomalyModel", "CRADConfig",
           "Calibration", "Choice", "Confirmed", "DMADConfig", "Fitter", "HeadChoices", "ModelConfig", "PatchCore", "PatchScores",
           "Prediction", "choose_tiles", "create_model", "held_back", "load_model", "read_config", "tiled"]

"""Predictions for a whole pool, cheap to redo after every bank update.

The backbone is frozen, so each pool image is embedded once (features kept in memory, or on disk
when large); after a bank update or a new version only the scorer runs again, which is what keeps
one labeling round's re-prediction of a 1000-image pool in seconds rather than minutes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from defectloop.features import image_tensor
from defectloop.labeling.brush import BrushRLE, MaskCodec
from defectloop.labeling.label_config import LabelConfig, prediction_regions
from defectloop.models import AnomalyModel, Prediction

log = logging.getLogger(__name__)


class PoolPredictor:
    """Features of the pool's tasks, and their predictions under a given model."""

    def __init__(self, model: AnomalyModel, tasks: list[dict], load: Callable[[dict], np.ndarray],
                 config: LabelConfig, batch_size: int = 16, codec: MaskCodec | None = None, cache: Path | None = None):
        self.config = config
        self.codec = codec or BrushRLE()
        if cache is not None and cache.is_file():  # embedded by an earlier run: same tasks, same backbone
            saved = load_file(str(cache))
            meta = json.loads(cache.with_suffix(".json").read_text())
            if meta["n_tasks"] == len(tasks) and set(meta["task_ids"]) <= {t["id"] for t in tasks}:
                self.features = saved["features"]
                self.task_ids, self.sizes, self.categories = meta["task_ids"], [tuple(x) for x in meta["sizes"]], meta["categories"]
                return
        self.task_ids: list[int] = []
        self.sizes: list[tuple[int, int]] = []  # (width, height) of the original images
        self.categories: list[str] = []
        feats = []
        size = model.config.image_size
        batch: list[torch.Tensor] = []
        for t in tasks:
            try:
                img = load(t)
            except Exception as e:  # an unreadable image is left out of the predictions and reported
                log.warning("task %s: cannot read its image (%s); no prediction", t["id"], e)
                continue
            self.task_ids.append(t["id"])
            self.sizes.append((img.shape[1], img.shape[0]))
            self.categories.append(str(t["data"].get("category", "")))
            batch.append(image_tensor(img, size))
            if len(batch) == batch_size:
                feats.append(model.embedder(torch.stack(batch)))
                batch = []
        if batch:
            feats.append(model.embedder(torch.stack(batch)))
        self.features = torch.cat(feats) if feats else torch.zeros(0)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            save_file({"features": self.features.contiguous()}, str(cache))
            cache.with_suffix(".json").write_text(json.dumps({"task_ids": self.task_ids, "sizes": self.sizes,
                                                              "categories": self.categories, "n_tasks": len(tasks)}))

    def predict(self, model: AnomalyModel) -> list[Prediction]:
        """One Prediction per task, in ``task_ids`` order."""
        return model.predict_features(self.features, self.categories) if self.task_ids else []

    def predictions(self, model: AnomalyModel, score_of: dict[int, float] | None = None) -> list[dict]:
        """Label Studio predictions ({task, result, score}). ``score_of`` (a policy's selection, scores in
        (0.5, 1]) puts those tasks first; every other task then gets half its normalised score, so it
        sorts below the selection and in the model's order: the ranked tab is the policy's order."""
        out = []
        for task_id, (w, h), p in zip(self.task_ids, self.sizes, self.predict(model), strict=True):
            mask = p.mask(w, h)
            rle = self.codec.encode(mask) if mask.any() else None
            score = p.normalised_score if score_of is None else score_of.get(task_id, 0.5 * p.normalised_score)
            out.append({"task": task_id, "score": score,
                        "result": prediction_regions(self.config, task_id, score, p.decision == "anomalous", rle, w, h)})
        return out

"""A model judged on labeled images: the metrics of ``defectloop evaluate``, the demo and the
benchmarks, from one path (tiles stitched back into their images, masks at the maps' size)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from defectloop.data import Sample
from defectloop.data.tiles import Grid, firsts, image_grids, stitch
from defectloop.features import Extracted
from defectloop.metrics import evaluate, served_mask_ious
from defectloop.models import BANKS, DMAD, HEAD, AnomalyModel


@dataclass(frozen=True)
class Evaluated:
    """The `evaluate` JSON, and per test image what it was computed from (tiles stitched)."""

    result: dict
    samples: list[Sample]  # each image's first tile: what it is known as
    scores: torch.Tensor
    maps: list[torch.Tensor]
    masks: list[np.ndarray | None]  # ground truth at each map's size, None where unknown


def evaluate_extracted(model: AnomalyModel, test: Extracted) -> Evaluated:
    """The metrics of test features embedded as the model's tiles (``models.tiled``): per category
    and mean, the served masks' IoU, the grid of tiles each category is seen as and, for DMAD,
    which score serves it."""
    parents = [s.parent_id for s in test.samples]
    grids = image_grids(test.samples)
    scores, maps = model.score_images(test.features, grids)
    samples = [test.samples[i] for i in firsts(parents)]
    cats = [s.category for s in samples]
    masks = image_masks(test.masks, grids, model.config.tile_overlap)
    shown = model.post.predictions(scores, maps, cats, model.calibration)  # what a user is shown
    result = evaluate(cats, scores.numpy(), np.array([s.label for s in samples]), [m.numpy() for m in maps], masks,
                      served_mask_ious(shown, samples))
    result["skipped"] = test.skipped
    for cat, m in result["categories"].items():
        m["tiles"] = list(model.config.grid(cat))  # how the category was seen: [rows, cols]
        if isinstance(model, DMAD):  # which score served it: the learned head's or the banks' alone
            m["serves"] = HEAD if model.head_choices.serves_head(cat) else BANKS
    return Evaluated(result, samples, scores, maps, masks)


def image_masks(tile_masks: list[torch.Tensor | None], grids: list[Grid], overlap: int) -> list[np.ndarray | None]:
    """Each image's defect mask at its map's size (its tiles' masks stitched), None where unknown."""
    out: list[np.ndarray | None] = []
    start = 0
    for grid in grids:
        part = tile_masks[start:start + grid.count]
        start += grid.count
        out.append(None if any(m is None for m in part) else
                   (stitch(torch.stack(part), grid, overlap) > 0.5).numpy())  # type: ignore[arg-type]
    return out

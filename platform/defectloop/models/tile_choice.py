"""The grid of tiles each category is inspected with, chosen at its first fit.

A 256 px view of a 512 px screw or a 640 px circuit board erases defects a few pixels wide: on
the dev screw images, PatchCore at 256 px ranks the test images at 89.9 image AUROC, seen as
3 x 3 tiles at their own 512 px at 98.3 (pixel AUROC 98.5 -> 99.6, docs/models.md). Other images
lose by it: magnetic tile (about 290 px, of every aspect) upsampled to 2 x 2 tiles fell from 94.2
to 91.3. So per category the candidates are one tile (the whole image at the model's size) and
the grid nearest the images' own resolution and aspect (at most ``max_tiles`` a side; images about a
tile's size have no other candidate), and the tiles serve only where they rank validation images
better by ``MARGIN``: held-back normal training images against labeled defects of the category
where it has two or more, else against the same normals with a small synthetic defect painted at
their own resolution (what a resize erases first; the screw: 0.764 whole, 0.891 as tiles). Each
candidate is judged with a PatchCore bank of the other normal images seen the same way: the
choice is about what the backbone sees, whatever model is fitted on it. It is recorded in the
version's config (``tiles``), so every path (training, scoring, the pool, ingestion) sees a
category alike, and a warm retraining keeps it.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from defectloop.data import ImageError, Sample
from defectloop.data.synthetic import add_defect
from defectloop.data.tiles import WHOLE, Grid, Tile, tiles, tiles_for
from defectloop.features import PatchEmbedder, load_backbone, tile_tensors
from defectloop.memory import KCenterGreedy, build_index
from defectloop.metrics import auroc
from defectloop.models.config import ModelConfig
from defectloop.models.holdout import hash_unit
from defectloop.models.prediction import PostProcessor

log = logging.getLogger(__name__)

#: images of a category a choice looks at: bank, validation normals, defects
FIT_IMAGES, VALIDATION_IMAGES = 24, 16
#: image AUROC by which the validation images must favour tiles: worth their cost, not noise
MARGIN = 0.02


def tiled(samples: Sequence[Sample], config: ModelConfig) -> list[Sample]:
    """Every sample as the tiles its category is seen as (an image's tiles consecutive, row by row)."""
    return [t for s in samples for t in s.tiled(config.tiling(s.category))]


def choose_tiles(config: ModelConfig, samples: Sequence[Sample], embedder: PatchEmbedder | None = None) -> ModelConfig:
    """``config`` with a grid of tiles for every category of ``samples`` it does not name yet."""
    todo = sorted({s.category for s in samples} - set(config.tiles))
    if not todo:
        return config
    chosen = dict(config.tiles)
    for cat in todo:
        normals = sorted((s for s in samples if s.category == cat and s.label == 0), key=lambda s: s.parent_id)
        native = tiles_for(*_typical_size(normals), config.image_size, config.tile_overlap, config.max_tiles)
        if native == WHOLE or len(normals) < 4:
            chosen[cat] = WHOLE
            continue
        embedder = embedder or PatchEmbedder(load_backbone(config.backbone, config.backbone_checkpoint))
        defects = [s for s in samples if s.category == cat and s.label == 1 and s.tile is None]
        defects = defects if len(defects) >= 2 else []  # one labeled defect ranks nothing: synthetic ones
        aurocs = {g: _validation_auroc(embedder, config, normals, defects, g) for g in (WHOLE, native)}
        chosen[cat] = native if aurocs[native] > aurocs[WHOLE] + MARGIN else WHOLE
        log.info("category %s: %d x %d tiles (image AUROC on %s defects: %s)", cat, *chosen[cat],
                 "real" if defects else "synthetic", ", ".join(f"{r} x {c} {a:.3f}" for (r, c), a in aurocs.items()))
    return replace(config, tiles=chosen)


def _typical_size(samples: Sequence[Sample]) -> tuple[int, int]:
    """Median (width, height) of up to 64 of the images (their headers only)."""
    sizes = []
    for s in samples[:64]:
        try:
            with Image.open(s.path) as img:
                sizes.append(img.size)
        except OSError:
            continue
    if not sizes:
        return 1, 1
    return int(statistics.median(w for w, _ in sizes)), int(statistics.median(h for _, h in sizes))


def _validation_auroc(embedder: PatchEmbedder, config: ModelConfig, normals: Sequence[Sample],
                      defects: Sequence[Sample], grid: Grid) -> float:
    """Image AUROC of held-back normals against ``defects`` (none: the same normals with small
    synthetic defects), with a PatchCore bank of the other normals, every image cut into ``grid``."""
    salt = f"{config.seed}/tiles"
    order = sorted(normals, key=lambda s: hash_unit(s.parent_id, salt))
    held, fit = order[:VALIDATION_IMAGES], order[VALIDATION_IMAGES:VALIDATION_IMAGES + FIT_IMAGES]
    if len(fit) < 2:
        held, fit = order[: len(order) // 2], order[len(order) // 2:]
    tiling = tiles(grid, config.image_size, config.tile_overlap)
    bank = torch.cat([_patches(embedder, img, tiling) for img in _images(fit)])
    bank = bank[KCenterGreedy(seed=config.seed).select(bank, max(1, int(config.coreset_ratio * 2 * len(bank))))]
    index = build_index(bank)
    post = PostProcessor(config.image_size, config.smoothing_sigma, config.tile_overlap)

    g = embedder.grid(config.image_size)

    def score(image: np.ndarray) -> float:
        q = _patches(embedder, image, tiling)
        maps = post.maps(index.search(q)[0].view(len(tiling), g, g))
        return float(post.stitched(post.image_scores(maps), maps, [grid])[0][0])

    clean = list(_images(held))
    if defects:
        bad = list(_images(defects[:VALIDATION_IMAGES]))
    else:  # small synthetic defects, at the images' own resolution
        rng = np.random.default_rng(config.seed)
        bad = [_small_defect(img, rng) for img in clean for _ in range(2)]
    scores = [score(img) for img in clean + bad]
    return auroc(np.array(scores), np.array([0] * len(clean) + [1] * len(bad))) or 0.5


def _images(samples: Sequence[Sample]):
    for s in samples:
        try:
            yield s.read()
        except ImageError as e:
            log.warning("tile choice: %s", e)


@torch.no_grad()
def _patches(embedder: PatchEmbedder, image: np.ndarray, tiling: Sequence[Tile]) -> torch.Tensor:
    """Patch features (tiles x h x w rows, C columns) of an image seen as ``tiling``."""
    f = embedder(tile_tensors(image, tiling, tiling[0].size)).float()
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])


def _small_defect(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image with a defect painted in a random window of a sixth of its side (a defect of
    about 1-3% of the side: what a resize to the model's size erases first)."""
    h, w = image.shape[:2]
    wh, ww = max(8, h // 6), max(8, w // 6)
    y, x = int(rng.integers(h // 6, max(h // 6 + 1, h - wh - h // 6))), int(rng.integers(w // 6, max(w // 6 + 1, w - ww - w // 6)))
    out = image.copy()
    out[y:y + wh, x:x + ww] = add_defect(np.ascontiguousarray(image[y:y + wh, x:x + ww]), rng=rng)[0]
    return out

"""From patch scores to what a user sees: smoothed map, image score, decision, predicted mask.

:class:`PostProcessor` is the one way from a model's patch scores to a :class:`Prediction`; the
Serve routes, the Label Studio backend, the pool's predictions and the CLI all consume
Predictions, so a score, a decision or a mask means the same thing everywhere.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from defectloop.data.tiles import Grid, shown, stitch
from defectloop.models.calibration import Calibration, Decision


def map_operator(n: int, size: int, sigma: float) -> torch.Tensor:
    """size x n matrix of "bilinear upsampling from n to size, then Gaussian smoothing" along one axis.

    Both steps are linear and separable, so a whole anomaly map is ``A_h @ patch_map @ A_w.T``:
    two small GEMMs instead of a 256 x 256 upsampling plus two 33-tap convolutions (~15x faster
    on CPU). Smoothing uses reflect padding and a kernel truncated at 4 sigma.
    """
    eye = torch.eye(n)[:, None]
    up = F.interpolate(eye, size=size, mode="linear", align_corners=False)  # n x 1 x size: rows = U.T
    if sigma > 0:
        radius = min(max(1, int(math.ceil(4 * sigma))), size - 1)
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k = torch.exp(-(x**2) / (2 * sigma**2))
        up = F.conv1d(F.pad(up, (radius, radius), mode="reflect"), (k / k.sum()).view(1, 1, -1))
    return up[:, 0].T.contiguous()


@dataclass(frozen=True)
class Prediction:
    """One image's outcome under one model."""

    score: float  # raw anomaly score (higher = more anomalous)
    normalised_score: float  # in (0, 1), the category's threshold at 0.5
    threshold: float | None
    pixel_threshold: float | None
    decision: Decision
    category: str | None
    known_category: bool  # False: the all-category thresholds were used
    amap: np.ndarray  # smoothed anomaly map: S x S at the model's input size, or its grid's shape (stitched)

    def mask(self, width: int, height: int) -> np.ndarray:
        """H x W bool defect mask: where the map, at the image's size, exceeds the pixel threshold,
        on an image called anomalous (an image called normal has no defect to show, whatever its map).

        The map is brought to the image's size as bytes, not floats (a 49 MP float map is 196 MB,
        twice over while Pillow resizes it): it is scaled around the threshold into 0..255 with
        the threshold at 128 (linear, so it commutes with the bilinear resize) and cut at 128, which
        differs from cutting the float map only within 1/127 of the map's range around the threshold."""
        t = self.pixel_threshold
        if t is None or self.decision != "anomalous":
            return np.zeros((height, width), bool)
        if (self.amap.shape[1], self.amap.shape[0]) == (width, height):
            return self.amap > t
        spread = max(float(np.abs(self.amap - t).max()), 1e-12)
        q = np.clip(np.rint(128 + (self.amap - t) * (127 / spread)), 0, 255).astype(np.uint8)
        return np.asarray(Image.fromarray(q, "L").resize((width, height), Image.BILINEAR)) > 128

    def heatmap_png(self, width: int, height: int) -> bytes:
        """The anomaly map as a colour PNG (jet palette) at the image size; the pixel threshold sits
        mid-scale. Coloured at the model's size and resized as palette indices: one byte a pixel at
        the image size, not matplotlib's four float64s."""
        a = self.amap
        t = self.pixel_threshold
        top = 2 * t if t and t > 0 else max(float(a.max()), 1e-6)
        index = Image.fromarray(np.rint(np.clip(a / top, 0, 1) * 255).astype(np.uint8), "L")
        if index.size != (width, height):
            index = index.resize((width, height), Image.BILINEAR)
        index.putpalette(_jet_palette())
        buf = io.BytesIO()
        index.save(buf, format="PNG", optimize=False, compress_level=1)
        return buf.getvalue()


@functools.cache
def _jet_palette() -> bytes:
    from matplotlib import colormaps

    return (colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8).tobytes()


class PostProcessor:
    """Patch scores -> smoothed maps -> image scores -> Predictions under a calibration."""

    def __init__(self, image_size: int, smoothing_sigma: float, tile_overlap: int = 0):
        self.size = image_size
        self.overlap = tile_overlap
        self.sigma = smoothing_sigma * image_size / 256  # the sigma is given at 256 px
        self._ops: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._needed: dict[tuple[Grid, int, int], torch.Tensor] = {}  # (grid, h, w) -> tiles x h x w

    def _operators(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (h, w) not in self._ops:
            self._ops[(h, w)] = map_operator(h, self.size, self.sigma), map_operator(w, self.size, self.sigma)
        return self._ops[(h, w)]

    def maps(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """B x H x W patch scores -> B x S x S maps (bilinear upsampling, then Gaussian smoothing)."""
        a_h, a_w = self._operators(*patch_scores.shape[1:])
        return a_h @ patch_scores @ a_w.T

    def needed(self, grids: Sequence[Grid], h: int, w: int) -> torch.Tensor | None:
        """Which patches (B x H x W bool) of tiles (``grids``: the grid of each image, its tiles
        consecutive rows) reach their images' stitched maps; None when every image is one tile (all do).

        A stitched map shows only the middle of an inner tile (``tiles.shown``), and the map
        operators say exactly which patches weigh on those pixels: every other patch's score is
        multiplied by zero, so a model need not compute it. For 3 x 3 tiles of 256 px overlapping
        by 128 px that is 63% of the patches, for 8 x 8 tiles 53%."""
        if all(g.count == 1 for g in grids):
            return None
        parts = []
        for grid in grids:
            if (grid, h, w) not in self._needed:
                a_h, a_w = self._operators(h, w)
                rows = [a_h[y0:y1].ne(0).any(0) for y0, y1 in shown(grid.rows, self.size, self.overlap)]
                cols = [a_w[x0:x1].ne(0).any(0) for x0, x1 in shown(grid.cols, self.size, self.overlap)]
                self._needed[(grid, h, w)] = torch.stack([r[:, None] & c[None] for r in rows for c in cols])
            parts.append(self._needed[(grid, h, w)])
        return torch.cat(parts)

    def image_scores(self, maps: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """The most anomalous 32 px window (stride 8 px, at 256 px) of each smoothed map, as the
        published CRAD: a defect is an area, while normal texture leaves scattered single-patch highs
        (measured gains in docs/models.md). Maps of tiled images (a list: their sizes differ) are
        scored as ``stitched`` scores them."""
        if not isinstance(maps, torch.Tensor):
            return torch.stack([self.image_scores(m[None])[0] for m in maps]) if len(maps) else torch.zeros(0)
        scale = self.size / 256
        window, stride = max(1, round(32 * scale)), max(1, round(8 * scale))
        # a window's mean as the mean of its columns' means: the same windows, 2.5x faster on CPU
        columns = F.avg_pool2d(maps[:, None], (window, 1), (stride, 1))
        return F.avg_pool2d(columns, (1, window), (1, stride)).flatten(1).max(1).values

    def stitched(self, scores: torch.Tensor, maps: torch.Tensor, grids: Sequence[Grid]
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Tiles' scores and maps -> their images': the tiles' maps stitched (``grids``: the grid
        of each image, its tiles consecutive rows, row by row) and each stitched map's image score
        (one tile: its own score)."""
        out_scores, out_maps, start = [], [], 0
        for grid in grids:
            out_maps.append(stitch(maps[start:start + grid.count], grid, self.overlap))
            out_scores.append(scores[start] if grid.count == 1 else self.image_scores(out_maps[-1][None])[0])
            start += grid.count
        return (torch.stack(out_scores) if out_scores else scores[:0]), out_maps

    @staticmethod
    def predictions(scores: torch.Tensor, maps: torch.Tensor | Sequence[torch.Tensor], categories: Sequence[str | None],
                    calibration: Calibration) -> list[Prediction]:
        out = []
        for s, m, cat in zip(scores.tolist(), maps, categories, strict=True):
            out.append(Prediction(
                score=float(s), normalised_score=calibration.normalise(s, cat), threshold=calibration.threshold(cat),
                pixel_threshold=calibration.pixel_threshold(cat, float(m.max())), decision=calibration.decide(s, cat),
                category=cat,
                known_category=calibration.knows(cat), amap=m.numpy()))
        return out

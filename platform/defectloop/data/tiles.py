"""Tiles: how an image larger than the model's input is inspected at (near) its own resolution.

A category is inspected as a grid of ``rows`` x ``cols`` tiles (:class:`Grid`): each image is
resized to ``side(cols)`` x ``side(rows)`` pixels and cut into tiles of the model's input size
``t``, neighbours sharing ``overlap`` pixels: side(n) = t + (n - 1) * (t - overlap). The grid
follows the images' aspect (a 4:3 camera image as 6 x 8 tiles, not stretched to a square). One
tile (1 x 1) is the whole image at the model's size. Every tile is a model input like any other
image: the banks are built from tiles, and a tile is scored alone. The image's map is its tiles'
maps stitched back, each pixel from the tile it lies deepest in (``stitch``), and its score is
that map's (``PostProcessor.stitched``).

Why tiles rather than a larger input: every batch of the backbone, the banks and the heads stays
one shape (t x t), whatever mix of categories and scales, and memory per tile is bounded.
Measured on the dev screw (docs/models.md): averaging overlaps kept the padding artefacts of tile
borders in normal images' scores (image AUROC 84.9-89.4); seams mid-overlap with 128 px of it
ranked as the whole 512 px image did (98.3 against 98.4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image


class Grid(NamedTuple):
    """How many tiles down (``rows``) and across (``cols``) an image is cut into."""

    rows: int
    cols: int

    @property
    def count(self) -> int:
        """Tiles in all: an image's rows of features."""
        return self.rows * self.cols

    @property
    def key(self) -> str:
        """``3`` for 3 x 3 (what keys said before grids could be oblong), ``2x3`` otherwise."""
        return str(self.rows) if self.rows == self.cols else f"{self.rows}x{self.cols}"

    def shape(self, tile: int, overlap: int) -> tuple[int, int]:
        """(height, width) in pixels of an image cut into this grid of ``tile`` px tiles."""
        return side(self.rows, tile, overlap), side(self.cols, tile, overlap)

    @classmethod
    def of(cls, value: int | Sequence[int]) -> Grid:
        """A grid from a config or saved file: n (n x n, as versions before oblong grids say) or
        [rows, cols]."""
        if isinstance(value, int):
            rows, cols = value, value
        else:
            rows, cols = (int(v) for v in value)
        if rows < 1 or cols < 1:
            raise ValueError(f"a grid of tiles needs at least one row and one column, not {rows} x {cols}")
        return cls(rows, cols)


#: the whole image as one tile
WHOLE = Grid(1, 1)


def side(n: int, tile: int, overlap: int) -> int:
    """Pixels along a side cut into n tiles of ``tile`` px, neighbours overlapping by ``overlap``."""
    return tile + (n - 1) * (tile - overlap)


def tiles_for(width: int, height: int, tile: int, overlap: int, most: int) -> Grid:
    """The grid that keeps an image closest to its own resolution (in log scale) and aspect, at
    most ``most`` tiles a side: an image whose long side exceeds ``side(most)`` is scaled down
    whole first. 1 x 1 for images up to about a tile's size."""
    scale = min(1.0, side(most, tile, overlap) / max(width, height, 1))

    def count(length: int) -> int:
        target = max(1.0, length * scale)
        return min(range(1, max(1, most) + 1), key=lambda n: abs(math.log(side(n, tile, overlap) / target)))

    return Grid(count(height), count(width))


@dataclass(frozen=True)
class Tile:
    """Tile (row, col) of an image cut into a grid of ``size`` px tiles overlapping by ``overlap``."""

    grid: Grid
    row: int
    col: int
    size: int
    overlap: int

    @property
    def key(self) -> str:
        """The suffix of the tile's image id: ``@3:row,col`` (3 x 3), ``@2x3:row,col``."""
        return f"@{self.grid.key}:{self.row},{self.col}"

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the image resized for its grid."""
        return self.grid.shape(self.size, self.overlap)

    @property
    def box(self) -> tuple[int, int]:
        """(y, x) of the tile's top-left corner in the image resized to ``shape``."""
        step = self.size - self.overlap
        return self.row * step, self.col * step

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The tile's pixels (size x size x 3) of an H x W x 3 uint8 image, resized to ``shape`` first."""
        return self.cut(resized(image, *self.shape))

    def cut(self, pixels: np.ndarray) -> np.ndarray:
        """The tile's part of an image already at ``shape``: its tiles cut from one resize."""
        y, x = self.box
        return pixels[y:y + self.size, x:x + self.size]


def resized(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """An H x W x 3 uint8 image at height x width: what a grid's tiles are cut from, and what its
    stitched map shows. A large image is box-reduced by an integer factor first, as ``read_image``
    does: a camera image never becomes a full-size float array."""
    img = Image.fromarray(image)
    k = max(1, min(img.width // (2 * width), img.height // (2 * height)))
    if k > 1:
        img = img.reduce(k)
    if img.size != (width, height):
        img = img.resize((width, height), Image.BILINEAR)
    return np.asarray(img)


def defective_fraction(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """An H x W bool mask at height x width: the defective fraction of each pixel (float32)."""
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


def tiles(grid: Grid, size: int, overlap: int) -> list[Tile]:
    """The tiles of an image cut into ``grid``, row by row (the order ``stitch`` takes their maps in)."""
    return [Tile(grid, r, c, size, overlap) for r in range(grid.rows) for c in range(grid.cols)]


def shown(n: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Along one side, the pixels [lo, hi) of the i-th of n tiles that its image's stitched map
    shows: from the middle of one overlap to the middle of the next (the whole tile when n = 1)."""
    half = overlap // 2
    return [(0 if i == 0 else half, size if i == n - 1 else size - (overlap - half)) for i in range(n)]


def stitch(maps: torch.Tensor, grid: Grid, overlap: int) -> torch.Tensor:
    """The tile maps of an image cut into ``grid`` (row by row, each size x size) -> the image's
    map (its grid's shape). Each pixel comes from the tile it lies deepest in (the middle of each
    overlap is the seam): a tile's border, where the backbone saw padding instead of the image,
    is never shown when a neighbour saw that place whole."""
    if grid.count == 1:
        return maps[0]
    m = maps.shape[-1]
    step = m - overlap
    out = maps.new_zeros(grid.shape(m, overlap))
    for i, (y0, y1) in enumerate(shown(grid.rows, m, overlap)):
        for j, (x0, x1) in enumerate(shown(grid.cols, m, overlap)):
            out[i * step + y0:i * step + y1, j * step + x0:j * step + x1] = maps[i * grid.cols + j, y0:y1, x0:x1]
    return out


def firsts(parents: Sequence) -> list[int]:
    """Where each run of equal ids starts: the first tile of each image."""
    return [i for i, p in enumerate(parents) if i == 0 or p != parents[i - 1]]


def image_grids(samples: Sequence) -> list[Grid]:
    """The grid of each image of ``samples`` (samples.Sample: whole images, or tiles with an
    image's tiles consecutive)."""
    parents = [s.parent_id for s in samples]
    return [samples[i].tile.grid if samples[i].tile else WHOLE for i in firsts(parents)]

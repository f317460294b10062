"""Tiles: how an image larger than the model's input is inspected at (near) its own resolution.

A category inspected with ``n`` tiles a side has each image resized to ``side(n)`` pixels a side
and cut into n x n tiles of the model's input size ``t``, neighbours sharing ``overlap`` pixels:
side(n) = t + (n - 1) * (t - overlap). One tile (n = 1) is the whole image at the model's size.
Every tile is a model input like any other image: the banks are built from tiles, and a tile is
scored alone. The image's map is its tiles' maps stitched back, each pixel from the tile it lies
deepest in (``stitch``), and its score is that map's (``PostProcessor.stitched``).

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

import numpy as np
import torch
from PIL import Image


def side(n: int, tile: int, overlap: int) -> int:
    """Pixels a side of an image cut into n x n tiles of ``tile`` px overlapping by ``overlap``."""
    return tile + (n - 1) * (tile - overlap)


def per_side(count: int) -> int:
    """Tiles a side of an image cut into ``count`` tiles (n x n)."""
    n = math.isqrt(count)
    if n * n != count:
        raise ValueError(f"{count} tiles do not make a square")
    return n


def tiles_for(width: int, height: int, tile: int, overlap: int, most: int) -> int:
    """Tiles a side that keep an image closest to its own resolution (in log scale), at most
    ``most``: 1 for images up to about a tile's size."""
    native = math.sqrt(width * height)
    return min(range(1, max(1, most) + 1), key=lambda n: abs(math.log(side(n, tile, overlap) / native)))


@dataclass(frozen=True)
class Tile:
    """Tile (row, col) of an image cut into n x n tiles of ``size`` px overlapping by ``overlap``."""

    n: int
    row: int
    col: int
    size: int
    overlap: int

    @property
    def key(self) -> str:
        """The suffix of the tile's image id: ``@n:row,col``."""
        return f"@{self.n}:{self.row},{self.col}"

    @property
    def side(self) -> int:
        return side(self.n, self.size, self.overlap)

    @property
    def box(self) -> tuple[int, int]:
        """(y, x) of the tile's top-left corner in the image resized to ``side``."""
        step = self.size - self.overlap
        return self.row * step, self.col * step

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The tile's pixels (size x size x 3) of an H x W x 3 uint8 image, resized to ``side`` first
        (a large image box-reduced by an integer factor before, as ``read_image`` does: a camera
        image never becomes a full-size float array)."""
        img = Image.fromarray(image)
        k = max(1, min(img.width, img.height) // (2 * self.side))
        if k > 1:
            img = img.reduce(k)
        if img.size != (self.side, self.side):
            img = img.resize((self.side, self.side), Image.BILINEAR)
        y, x = self.box
        return np.asarray(img)[y:y + self.size, x:x + self.size]

    def crop_mask(self, mask: np.ndarray) -> np.ndarray:
        """The defective fraction of each pixel of the tile (float32, size x size) of an H x W bool mask."""
        img = Image.fromarray(mask.astype(np.uint8) * 255).resize((self.side, self.side), Image.BOX)
        y, x = self.box
        return np.asarray(img, dtype=np.float32)[y:y + self.size, x:x + self.size] / 255.0


def tiles(n: int, size: int, overlap: int) -> list[Tile]:
    """The n x n tiles of an image, row by row (the order ``stitch`` takes their maps in)."""
    return [Tile(n, r, c, size, overlap) for r in range(n) for c in range(n)]


def shown(n: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Along one side, the pixels [lo, hi) of the i-th of n tiles that its image's stitched map
    shows: from the middle of one overlap to the middle of the next (the whole tile when n = 1)."""
    half = overlap // 2
    return [(0 if i == 0 else half, size if i == n - 1 else size - (overlap - half)) for i in range(n)]


def stitch(maps: torch.Tensor, n: int, overlap: int) -> torch.Tensor:
    """n*n tile maps (row by row, each size x size) -> the image's map (side x side). Each pixel
    comes from the tile it lies deepest in (the middle of each overlap is the seam): a tile's
    border, where the backbone saw padding instead of the image, is never shown when a
    neighbour saw that place whole."""
    if n == 1:
        return maps[0]
    m = maps.shape[-1]
    step, part = m - overlap, shown(n, m, overlap)
    out = maps.new_zeros(side(n, m, overlap), side(n, m, overlap))
    for i, (y0, y1) in enumerate(part):
        for j, (x0, x1) in enumerate(part):
            out[i * step + y0:i * step + y1, j * step + x0:j * step + x1] = maps[i * n + j, y0:y1, x0:x1]
    return out


def firsts(parents: Sequence) -> list[int]:
    """Where each run of equal ids starts: the first tile of each image."""
    return [i for i, p in enumerate(parents) if i == 0 or p != parents[i - 1]]


def runs(parents: Sequence) -> list[int]:
    """Lengths of the runs of equal ids: an image's tiles are consecutive rows wherever they go."""
    out: list[int] = []
    for i, p in enumerate(parents):
        if i and p == parents[i - 1]:
            out[-1] += 1
        else:
            out.append(1)
    return out

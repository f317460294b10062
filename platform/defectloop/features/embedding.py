"""Patch embedding (PatchCore/SimpleNet style) and batched feature extraction.

Stride-8 and stride-16 maps are each averaged over their 3x3 neighbourhood (local context), the
stride-16 map is upsampled to the stride-8 grid and both are concatenated: a 256 px image gives a
32 x 32 grid of C-dim patch vectors (C = 152 for tf_efficientnet_lite0).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from defectloop.data.images import ImageError, load_image, load_mask, reduction
from defectloop.data.mvtec import Sample
from defectloop.data.tiles import Tile, defective_fraction, resized
from defectloop.features.backbones import FeatureBackbone
from defectloop.progress import bar as progress_bar

log = logging.getLogger(__name__)


class PatchEmbedder(nn.Module):
    """Backbone + local aggregation: images (B x 3 x S x S in [0, 1]) -> B x C x S/8 x S/8."""

    def __init__(self, backbone: FeatureBackbone):
        super().__init__()
        self.backbone = backbone
        self.dim = sum(backbone.channels)

    @staticmethod
    def grid(image_size: int) -> int:
        """Side of the patch grid for a square image (stride 8, padded like the backbones)."""
        return math.ceil(image_size / 8)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f8, f16 = self.backbone(images)
        f8 = F.avg_pool2d(f8, 3, stride=1, padding=1, count_include_pad=False)
        f16 = F.avg_pool2d(f16, 3, stride=1, padding=1, count_include_pad=False)
        f16 = F.interpolate(f16, size=f8.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([f8, f16], dim=1)


def image_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """RGB uint8 H x W x 3 -> 3 x size x size float tensor in [0, 1] (antialiased resize; a very
    large image is box-reduced first, as ``read_image`` reads it)."""
    img = Image.fromarray(image)
    k = reduction(img.width, img.height, size)
    img = (img.reduce(k) if k > 1 else img).resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def tile_tensors(image: np.ndarray, tiling: Sequence[Tile], size: int) -> torch.Tensor:
    """An image as the model inputs of these tiles of it (T x 3 x size x size, in their order);
    for no tiles or the whole grid's one, the whole image."""
    if whole_image(tiling):
        return image_tensor(image, size)[None]
    pixels = resized(image, *tiling[0].shape)  # once, not once per tile: 64 resizes of a 12 MP image cost seconds
    return torch.stack([image_tensor(t.cut(pixels), size) for t in tiling])


def tile_mask_tensors(mask: np.ndarray, tiling: Sequence[Tile], size: int) -> torch.Tensor:
    """A bool H x W mask as the defective fraction of each pixel of its image's tiles (T x size x
    size, as ``tile_tensors``): one resize of the mask, every tile cut from it."""
    if whole_image(tiling):
        return mask_tensor(mask, size)[None]
    fraction = defective_fraction(mask, *tiling[0].shape)
    return torch.stack([torch.from_numpy(t.cut(fraction)) for t in tiling])


def whole_image(tiling: Sequence[Tile]) -> bool:
    """Whether these tiles are the image whole (none, or the one tile of a 1 x 1 grid)."""
    return not tiling or tiling[0].grid.count == 1


def mask_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """Bool H x W mask -> size x size float tensor: the defective fraction of each output pixel."""
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.BOX)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)


def mask_cells(feats: torch.Tensor, coverage: torch.Tensor, threshold: float) -> torch.Tensor:
    """Patch features (C x H x W) whose cell the mask covers at least ``threshold`` (area pooling).

    Area pooling, not point sampling: bilinear sampling of the mask would see only the 2 x 2 centre
    pixels of each 8 x 8 cell and miss thin defects."""
    c, h, w = feats.shape
    cov = F.adaptive_avg_pool2d(coverage[None, None], (h, w))[0, 0]
    return feats.permute(1, 2, 0)[cov >= threshold]


@dataclass
class Extracted:
    """Patch features of a list of samples (those that could be read), in order."""

    features: torch.Tensor  # N x C x H x W
    samples: list[Sample]
    masks: list[torch.Tensor | None]  # size x size defect coverage, None if unknown
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def _load(group: Sequence[Sample], size: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The model inputs and defect coverage of samples of one image (some or all of its tiles, or
    the image whole): the image and its mask are decoded once and resized once, and each tile is
    cut from that (a 12 MP image decoded once per tile of a 6 x 8 grid would be 48 decodes)."""
    first = group[0]
    image = load_image(first.path)
    tiling = [s.tile for s in group if s.tile is not None]
    inputs = tile_tensors(image, tiling, size)
    if first.mask_path is not None:
        masks = list(tile_mask_tensors(load_mask(first.mask_path, expected_hw=image.shape[:2]), tiling, size))
    else:
        masks = [torch.zeros(size, size) if s.label == 0 else None for s in group]
    return list(zip(inputs, masks, strict=True))


def _by_image(samples: Sequence[Sample]) -> Iterator[list[Sample]]:
    """Consecutive samples that are tiles of one image (one grid), as one group; others alone."""
    group: list[Sample] = []
    for s in samples:
        if group and not (s.tile and group[0].tile and s.path == group[0].path and s.tile.grid == group[0].tile.grid):
            yield group
            group = []
        group.append(s)
    if group:
        yield group


def feature_buffer(shape: tuple[int, ...], max_memory: int, cache_dir: str | None = None) -> torch.Tensor:
    """A float32 tensor of this shape: in RAM when it fits ``max_memory`` bytes, else on disk.

    The disk variant is a memory-mapped file in ``cache_dir`` (default: the temp folder) that is
    unlinked at once, so the OS pages features in and out and the file vanishes with the tensor.
    """
    if math.prod(shape) * 4 <= max_memory:
        return torch.empty(shape)
    fd, path = tempfile.mkstemp(prefix="defectloop-features-", suffix=".npy", dir=cache_dir)
    os.close(fd)
    try:
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    finally:
        os.unlink(path)
    log.info("features (%.1f GB) cached on disk in %s", math.prod(shape) * 4 / 1e9, cache_dir or tempfile.gettempdir())
    return torch.from_numpy(array)


def extract(embedder: PatchEmbedder, samples: Sequence[Sample], image_size: int = 256, batch_size: int = 16,
            progress: bool | str = False, device: str | torch.device = "cpu", max_memory: int = 8 << 30,
            cache_dir: str | None = None) -> Extracted:
    """Embed samples in batches; unreadable files are skipped and reported, never silently.

    Features above ``max_memory`` bytes go to a disk cache (see :func:`feature_buffer`).
    """
    grid = embedder.grid(image_size)
    out = feature_buffer((len(samples), embedder.dim, grid, grid), max_memory, cache_dir)
    n_done = 0
    kept: list[Sample] = []
    masks: list[torch.Tensor | None] = []
    skipped: list[tuple[str, str]] = []
    desc = progress if isinstance(progress, str) else "features"
    bar = progress_bar(total=len(samples), desc=desc, unit="img", shown=progress)

    def load(group: list[Sample]):
        try:
            return _load(group, image_size)
        except ImageError as e:
            return e

    def flush(batch: list[torch.Tensor]) -> None:
        nonlocal n_done
        if batch:
            out[n_done:n_done + len(batch)] = embedder(torch.stack(batch).to(device)).float().cpu()
            n_done += len(batch)
            bar.update(len(batch))
            batch.clear()

    with ThreadPoolExecutor(max_workers=2) as pool:
        # decoding runs ahead of the backbone by at most a few batches of tiles (bounded memory),
        # one image (all its tiles) per job
        queue: deque = deque()
        groups = _by_image(samples)
        ahead = 0

        def submit() -> None:
            nonlocal ahead
            while ahead < 4 * batch_size and (group := next(groups, None)) is not None:
                queue.append((group, pool.submit(load, group)))
                ahead += len(group)

        submit()
        batch: list[torch.Tensor] = []
        while queue:
            group, future = queue.popleft()
            ahead -= len(group)
            submit()
            res = future.result()
            if isinstance(res, ImageError):
                skipped.extend((str(s.path), res.reason) for s in group)
                log.warning("skipped %s: %s", group[0].path, res.reason)
                bar.update(len(group))
                continue
            for sample, (tensor, mask) in zip(group, res, strict=True):
                batch.append(tensor)
                kept.append(sample)
                masks.append(mask)
                if len(batch) == batch_size:
                    flush(batch)
        flush(batch)
    bar.close()
    if not kept:
        raise ValueError(f"none of the {len(samples)} images could be read")
    return Extracted(out[:n_done], kept, masks, skipped)

"""Dataset readers for the MVTec folder layout, one or many categories.

    <category>/train/good/*                    normal training images
    <category>/test/good/*, test/<defect>/*    test images
    <category>/ground_truth/<defect>/<stem>_mask.png

The category travels as metadata for per-category metrics and thresholds; models never see it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from defectloop.data.images import IMAGE_SUFFIXES, load_image
from defectloop.data.tiles import Tile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One image of a pool, with what is known about it; or one tile of it (``tile``)."""

    path: Path
    category: str
    label: int = 0  # 0 normal, 1 anomalous
    defect: str = "good"
    mask_path: Path | None = None
    tile: Tile | None = None  # the part of the image this sample is (None: the whole image)

    @property
    def parent_id(self) -> str:
        """Stable id of the image: category/split/defect/file name (provenance, hold-out sides)."""
        parts = self.path.parts[-3:]
        return f"{self.category}/{'/'.join(parts)}"

    @property
    def image_id(self) -> str:
        """Stable id of this sample: the image's, with the tile's key for a tile."""
        return self.parent_id + (self.tile.key if self.tile else "")

    def read(self) -> np.ndarray:
        """The sample's RGB pixels: the image, or the tile's crop of it."""
        image = load_image(self.path)
        return self.tile.crop(image) if self.tile else image

    def tiled(self, tiling: list[Tile]) -> list[Sample]:
        """This image as the given tiles (itself for one tile or none)."""
        if len(tiling) <= 1:
            return [self]
        return [replace(self, tile=t) for t in tiling]


@dataclass
class Split:
    """Training images (normal + seen anomalies with masks) and the held-out test images."""

    train: list[Sample]
    test: list[Sample]
    notes: list[str] = field(default_factory=list)

    @property
    def categories(self) -> list[str]:
        return sorted({s.category for s in self.train} | {s.category for s in self.test})


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def list_categories(root: str | Path) -> list[str]:
    """Category folders under ``root`` (those with a ``train/good`` folder)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    return sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())


def read_category(root: str | Path, category: str) -> tuple[list[Sample], list[Sample]]:
    """Normal training samples and test samples of one category."""
    base = Path(root) / category
    train = [Sample(p, category) for p in _images(base / "train" / "good")]
    if not train:
        raise ValueError(f"category {category!r} has no training images in {base / 'train' / 'good'}")
    test: list[Sample] = []
    test_dir = base / "test"
    for defect_dir in sorted(d for d in test_dir.iterdir() if d.is_dir()) if test_dir.is_dir() else []:
        defect = defect_dir.name
        for p in _images(defect_dir):
            if defect == "good":
                test.append(Sample(p, category))
                continue
            mask = base / "ground_truth" / defect / f"{p.stem}_mask.png"
            test.append(Sample(p, category, 1, defect, mask if mask.is_file() else None))
    return train, test


def load_split(root: str | Path, categories: list[str] | None = None, anomalies_per_class: int = 0,
               seed: int = 0) -> Split:
    """Read categories and move ``anomalies_per_class`` annotated test anomalies into training.

    Seen anomalies are drawn per category with a seeded shuffle over all defect types pooled
    (the DMAD protocol) and removed from evaluation. A category without pixel masks contributes
    none, says so in ``notes``, and keeps its whole test set.
    """
    available = list_categories(root)
    if categories:
        missing = sorted(set(categories) - set(available))
        if missing:
            raise ValueError(f"categories not found under {root}: {', '.join(missing)} "
                             f"(available: {', '.join(available) or 'none'})")
    else:
        categories = available
    if not categories:
        raise ValueError(f"no category with a train/good folder under {root}")
    split = Split([], [])
    for cat in categories:
        train, test = read_category(root, cat)
        if anomalies_per_class > 0:
            candidates = sorted((s for s in test if s.label == 1 and s.mask_path is not None),
                                key=lambda s: str(s.path))
            if not candidates:
                note = f"{cat}: no pixel masks, contributes no annotated anomalies; whole test set kept"
                split.notes.append(note)
                log.info(note)
            else:
                random.Random(f"{seed}/{cat}").shuffle(candidates)
                seen = candidates[:anomalies_per_class]
                if len(seen) < anomalies_per_class:
                    split.notes.append(f"{cat}: only {len(seen)} annotated anomalies available")
                seen_paths = {s.path for s in seen}
                train = train + seen
                test = [s for s in test if s.path not in seen_paths]
        split.train.extend(train)
        split.test.extend(test)
    return split


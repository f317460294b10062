"""Synthetic parts and defects with exact masks.

Used by unit tests (which must generate their own images), by the demo's generated data set, and
by DMAD's cold start (:class:`DefectAugmenter`), which fills the abnormal bank with synthetic
defects painted on real normal images before any annotation exists.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from defectloop.data.images import ImageError
from defectloop.data.mvtec import Sample

DEFECT_KINDS = ("scratch", "blob", "crack")


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Band-limited noise in [0, 1]: random values on a coarse grid, bicubically upsampled."""
    coarse = rng.random((max(2, size // scale), max(2, size // scale))).astype(np.float32)
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def make_part(kind: str, size: int = 256, rng: np.random.Generator | None = None) -> np.ndarray:
    """A defect-free RGB image of one of a few generated product kinds.

    ``tile``: fine isotropic texture; ``disc``: a shaded round part on a background;
    ``mesh``: a regular woven pattern. Each instance varies slightly (position, phase, lighting).
    """
    rng = rng or np.random.default_rng()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "tile":
        base = 0.55 + 0.25 * (_smooth_noise(rng, size, 4) - 0.5) + 0.1 * (_smooth_noise(rng, size, 32) - 0.5)
        rgb = np.stack([base * 0.9, base * 0.8, base * 0.7], axis=2)
    elif kind == "disc":
        cx, cy = 0.5 + rng.normal(0, 0.02, 2)
        r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        part = (r < 0.33).astype(np.float32)
        shade = 0.45 + 0.35 * np.clip(1 - r / 0.33, 0, 1) + 0.05 * (_smooth_noise(rng, size, 8) - 0.5)
        grey = part * shade + (1 - part) * (0.12 + 0.03 * _smooth_noise(rng, size, 16))
        rgb = np.stack([grey, grey, grey * 1.05], axis=2)
    elif kind == "mesh":
        phase = rng.uniform(0, 2 * np.pi, 2)
        period = 16 + rng.uniform(-0.5, 0.5)
        weave = 0.5 + 0.25 * np.sin(2 * np.pi * xx * size / period + phase[0]) * np.sin(
            2 * np.pi * yy * size / period + phase[1])
        weave += 0.05 * (_smooth_noise(rng, size, 4) - 0.5)
        rgb = np.stack([weave * 0.6, weave * 0.75, weave * 0.9], axis=2)
    else:
        raise ValueError(f"unknown part kind {kind!r}; choose tile, disc or mesh")
    light = 1.0 + rng.normal(0, 0.03)
    return (np.clip(rgb * light, 0, 1) * 255).astype(np.uint8)


def _defect_mask(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    s = min(h, w)
    # keep defects inside the central region, where every generated part has material
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    if kind == "scratch":
        ang = rng.uniform(0, np.pi)
        length = rng.uniform(0.15, 0.35) * s
        dx, dy = np.cos(ang) * length / 2, np.sin(ang) * length / 2
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=max(2, int(s * rng.uniform(0.01, 0.02))))
    elif kind == "blob":
        rx, ry = rng.uniform(0.04, 0.09, 2) * s
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    elif kind == "crack":
        pts = [(cx, cy)]
        ang = rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(8, 16))):
            ang += rng.normal(0, 0.6)
            step = s * 0.02
            pts.append((pts[-1][0] + np.cos(ang) * step, pts[-1][1] + np.sin(ang) * step))
        draw.line(pts, fill=255, width=max(2, int(s * 0.012)))
    else:
        raise ValueError(f"unknown defect kind {kind!r}; choose one of {DEFECT_KINDS}")
    return np.asarray(img) > 0


def add_defect(image: np.ndarray, kind: str | None = None, rng: np.random.Generator | None = None,
               strength: float = 0.85) -> tuple[np.ndarray, np.ndarray]:
    """Paint a defect on an RGB uint8 image; returns (image, exact bool mask).

    The defect changes colour and texture under the mask only (dark or bright, with its own noise),
    so the mask is exactly the set of changed pixels; ``strength`` is the paint's opacity (a low
    one makes a faint defect).
    """
    rng = rng or np.random.default_rng()
    kind = kind or DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))]
    h, w = image.shape[:2]
    mask = _defect_mask(kind, h, w, rng)
    out = image.astype(np.float32) / 255.0
    tone = rng.choice([0.05, 0.95]) if kind != "blob" else rng.uniform(0.0, 1.0)
    colour = np.clip(tone + rng.normal(0, 0.08, 3), 0, 1).astype(np.float32)
    texture = 0.15 * (_smooth_noise(rng, max(h, w), 2)[:h, :w, None] - 0.5)
    painted = (1 - strength) * out + strength * np.clip(colour[None, None, :] + texture, 0, 1)
    out = np.where(mask[:, :, None], painted, out)
    return (np.clip(out, 0, 1) * 255).astype(np.uint8), mask


def add_glare(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A benign change of conditions: a soft specular highlight somewhere on the part (new lighting).

    It is normal, but a model that never saw it flags it: what annotators teach by confirming normals.
    """
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    r = rng.uniform(0.15, 0.25) * min(h, w)
    light = 0.5 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    out = image.astype(np.float32) / 255.0 + light[:, :, None]
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


class DefectAugmenter:
    """Paints synthetic defects on a few normal images per category: abnormal examples before any
    annotation exists. The images picked and the defects painted depend on the seed alone."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def paint(self, items: Sequence[tuple[int, Sample]], per_category: int
              ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(key, painted RGB image, exact bool mask) for up to ``per_category`` of the (key, sample)
        pairs of each category; unreadable images are passed over."""
        per_cat: dict[str, list[tuple[int, Sample]]] = {}
        for key, s in items:
            per_cat.setdefault(s.category, []).append((key, s))
        rng = np.random.default_rng(self.seed)
        for cat, chosen in sorted(per_cat.items()):
            random.Random(f"{self.seed}/synthetic/{cat}").shuffle(chosen)
            for key, s in chosen[:per_category]:
                try:
                    image = s.read()
                except ImageError:
                    continue
                painted, mask = add_defect(image, rng=rng)
                yield key, painted, mask


def make_dataset(root: str | Path, categories: tuple[str, ...] = ("tile", "disc", "mesh"), n_train: int = 40,
                 n_test_good: int = 10, n_test_bad: int = 10, size: int = 256, seed: int = 0,
                 strength: tuple[float, float] = (0.85, 0.85), drift: float = 0.0) -> Path:
    """Write a small multi-category data set in MVTec layout with exact ground-truth masks.

    Defects are painted with an opacity drawn from ``strength`` (low: faint ones); ``drift`` of the
    test images (normal and defective alike) are taken under new conditions (``add_glare``) that the
    training images never show.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)

    def part(cat: str) -> np.ndarray:
        img = make_part(cat, size, rng)
        return add_glare(img, rng) if drift and rng.random() < drift else img  # no draw without drift

    for cat in categories:
        base = root / cat
        for sub in ("train/good", "test/good"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n_train):
            Image.fromarray(make_part(cat, size, rng)).save(base / "train/good" / f"{i:03d}.png")
        for i in range(n_test_good):
            Image.fromarray(part(cat)).save(base / "test/good" / f"{i:03d}.png")
        for i in range(n_test_bad):
            kind = DEFECT_KINDS[i % len(DEFECT_KINDS)]
            img = part(cat)
            opacity = strength[0] if strength[0] == strength[1] else float(rng.uniform(*strength))
            img, mask = add_defect(img, kind, rng, opacity)
            (base / "test" / kind).mkdir(parents=True, exist_ok=True)
            (base / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(base / "test" / kind / f"{i:03d}.png")
            Image.fromarray((mask * 255).astype(np.uint8)).save(base / "ground_truth" / kind / f"{i:03d}_mask.png")
    return root

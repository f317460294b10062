"""What is held back from fitting: normal training images (calibration, model selection), labeled
defects (the check of a learned head), and confirmed labels (the check a retrained version must
pass before it is served).

Both sides are decided by a seeded hash of an id, so an image keeps its side as data grows.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Sequence


def hash_unit(key: str, salt: str) -> float:
    """A stable number in [0, 1) for ``key``."""
    return int(hashlib.sha256(f"{salt}/{key}".encode()).hexdigest()[:12], 16) / 16**12


def held_back(key: str, fraction: float) -> bool:
    """Whether a confirmed label (keyed by its image) is kept out of retraining, to judge the result."""
    return hash_unit(key, "labels") < fraction


def split_holdout(samples: Sequence, fraction: float, seed: int, always_held: Collection[str] = ()) -> tuple[list[int], list[int]]:
    """Indices of (fit, held-back) normal samples.

    An image is held back when a seeded hash of its id falls below ``fraction``, so its side never
    changes when images are added: a warm retraining must not calibrate on images whose patches
    its bank already holds. The tiles of an image go with it. Per category with two images or
    more, at least one is held back and at least one fitted (the lowest and highest hash). Images
    whose id is in ``always_held`` are held back, on top of these (confirmed normals kept out of a
    retraining to judge it).
    """
    by_cat: dict[str, dict[str, list[int]]] = {}  # category -> image id -> its rows (tiles)
    for i, s in enumerate(samples):
        if s.label == 0:
            by_cat.setdefault(s.category, {}).setdefault(s.parent_id, []).append(i)
    fit, held = [], []
    for _, images in sorted(by_cat.items()):
        u = {image: hash_unit(image, f"{seed}/holdout") for image in images}
        forced = {image for image in images if image in always_held}
        rest = [image for image in images if image not in forced]
        out = {image for image in rest if u[image] < fraction}
        if fraction > 0 and len(rest) > 1 and not out:
            out = {min(rest, key=u.__getitem__)}
        elif rest and len(out) == len(rest):
            out.discard(max(rest, key=u.__getitem__))
        held += [i for image in out | forced for i in images[image]]
        fit += [i for image in rest if image not in out for i in images[image]]
    return sorted(fit), sorted(held)


def split_validation(defects: Sequence[tuple[str, str, bool]], fraction: float, seed: int) -> set[str]:
    """Ids of labeled defective images held back from a learned head, to judge it (see
    models/head_choice.py), from every (image id, category, has a mask) of the training set (all
    workers': the split must not depend on the sharding): every one without a mask (a head trains
    on masks only, so they cost nothing), and of those with a mask, per category with two or more,
    the ``fraction`` with the lowest seeded hash, at least one and never all."""
    by_cat: dict[str, list[str]] = {}
    held = {image_id for image_id, _, masked in defects if not masked}
    for image_id, category, masked in defects:
        if masked:
            by_cat.setdefault(category, []).append(image_id)
    for ids in by_cat.values():
        if len(ids) > 1 and fraction > 0:
            order = sorted(set(ids), key=lambda i: hash_unit(i, f"{seed}/validation"))
            held.update(order[:min(len(order) - 1, max(1, math.ceil(fraction * len(order))))])
    return held

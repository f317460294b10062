"""Predictions for a whole pool, cheap to redo after every bank update.

The backbone is frozen, so each pool image is embedded once (features kept in memory, or on disk
when large). A new model version scores the pool's features again (seconds, not the minutes of
embedding); a bank update re-scores only the images it moved (``AnomalyModel.pool_scores``), and
only those get a new mask: an annotation costs what it changed, not the pool.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from defectloop.data import read_image
from defectloop.data.tiles import Grid
from defectloop.features import tile_tensors
from defectloop.features.cache import FeatureCache, content_hash
from defectloop.labeling.brush import BrushRLE, MaskCodec
from defectloop.labeling.label_config import ANOMALOUS, NORMAL, LabelConfig, prediction_regions
from defectloop.models import AnomalyModel, Calibration, PatchScores
from defectloop.progress import bar as progress_bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What a task's prediction says, kept between bank updates (not the map: 256 KB an image)."""

    score: float  # the raw image score: which images a threshold change flips
    normalised_score: float
    anomalous: bool
    rle: list[int] | None  # the predicted mask, encoded; None when it is empty
    defect: str | None = None  # the defect type it resembles, where the banks know one


class PoolPredictor:
    """Features of the pool's tasks, and their predictions under a given model."""

    def __init__(self, model: AnomalyModel, tasks: list[dict], fetch: Callable[[dict], bytes],
                 config: LabelConfig, batch_size: int = 16, codec: MaskCodec | None = None, cache: Path | None = None,
                 features: FeatureCache | None = None):
        """``fetch``: a task's image file, as bytes. ``cache``: this pool's features, saved whenever
        the pool grows (a restart reads them back and embeds only the tasks they lack). ``features``:
        a feature cache by image content (``defectloop ingest`` fills one on a Ray cluster): images
        it holds are not embedded, and those it lacks are embedded here and put into it."""
        self.config = config
        self.codec = codec or BrushRLE()
        self.fetch, self.batch_size, self.feature_cache, self.cache = fetch, batch_size, features, cache
        self._scores: PatchScores | None = None  # the pool's patch scores under the last model asked for
        self._outcomes: list[Outcome] = []  # per task, under that model
        self._calibration: Calibration | None = None  # the thresholds the outcomes were decided by
        self.unreadable: set[int] = set()  # tasks whose image could not be read: not tried again
        self.task_ids, self.sizes, self.categories = [], [], []
        self.grids: list[Grid] = []  # per task: the grid of tiles its category is seen as (its rows of ``features``)
        self.features = torch.zeros(0)  # a row per tile, a task's tiles consecutive
        if cache is not None and cache.is_file():  # embedded by an earlier run (same backbone): its tasks still here
            meta = json.loads(cache.with_suffix(".json").read_text())
            present = {t["id"] for t in tasks}
            # [rows, cols] per task; files saved before oblong grids held each task's count of tiles (n * n)
            grids = [Grid.of(g if isinstance(g, list) else math.isqrt(g)) for g in meta.get("tiles") or [1] * len(meta["task_ids"])]
            starts = list(itertools.accumulate([0, *(g.count for g in grids)]))
            seen_as = {c: model.config.grid(c) for c in set(meta["categories"])}  # tiles may have been chosen anew
            keep = [i for i, t in enumerate(meta["task_ids"]) if t in present and grids[i] == seen_as[meta["categories"][i]]]
            if keep:
                self.features = load_file(str(cache))["features"][[r for i in keep for r in range(starts[i], starts[i + 1])]]
                self.task_ids = [meta["task_ids"][i] for i in keep]
                self.sizes = [tuple(meta["sizes"][i]) for i in keep]
                self.categories = [meta["categories"][i] for i in keep]
                self.grids = [grids[i] for i in keep]
            log.info("pool: %d of %d tasks' features from %s", len(keep), len(tasks), cache)
        known = set(self.task_ids)
        missing = [t for t in tasks if t["id"] not in known]
        if missing:
            self._join(*self._embed(model, missing))

    def _join(self, ids: list[int], sizes: list[tuple[int, int]], categories: list[str], grids: list[Grid],
              feats: torch.Tensor) -> None:
        """Embedded tasks join the pool (and the saved features, with a ``cache``)."""
        if not ids:
            return
        self.features = torch.cat([self.features, feats]) if self.task_ids else feats
        self.task_ids, self.sizes, self.categories = self.task_ids + ids, self.sizes + sizes, self.categories + categories
        self.grids = self.grids + grids
        for cached in ("index", "starts", "task_of_row"):
            self.__dict__.pop(cached, None)
        if self.cache is not None:  # rewritten whole, atomically: a crash leaves the old file or the new one
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache.with_name(f".{self.cache.name}.tmp")
            save_file({"features": self.features.contiguous()}, str(tmp))
            meta = self.cache.with_suffix(".json")
            meta_tmp = meta.with_name(f".{meta.name}.tmp")
            meta_tmp.write_text(json.dumps({"task_ids": self.task_ids, "sizes": self.sizes, "categories": self.categories,
                                            "tiles": self.grids}))
            tmp.replace(self.cache)
            meta_tmp.replace(meta)

    def _embed(self, model: AnomalyModel, tasks: list[dict]
               ) -> tuple[list[int], list[tuple[int, int]], list[str], list[Grid], torch.Tensor]:
        """(task ids, image sizes, categories, grids, features: a row per tile) of the tasks whose
        image can be read."""
        task_ids: list[int] = []
        sizes: list[tuple[int, int]] = []  # (width, height) of the original images
        categories: list[str] = []
        config, features = model.config, self.feature_cache
        feats: list[torch.Tensor | None] = []  # per task: cached features (tiles x C x H x W), or None until embedded
        hits = 0
        grids: list[Grid] = []
        batch: list[tuple[int, str, Grid, torch.Tensor]] = []  # (position, digest, grid, its tiles' inputs) waiting for the backbone

        def embed() -> None:
            inputs = torch.cat([x for *_, x in batch])
            out = model.embedder(inputs).float().split([len(x) for *_, x in batch])
            for (pos, digest, grid, x), f in zip(batch, out, strict=True):
                feats[pos] = f
                if features is not None:
                    features.put(digest, f if len(x) > 1 else f[0], sizes[pos], grid)
            batch.clear()

        for t in progress_bar(tasks, desc="embedding the pool", unit="image"):
            category = str(t["data"].get("category", ""))
            grid = config.grid(category)
            try:
                data = self.fetch(t)
                digest = content_hash(data)
                hit = features.find(digest, grid) if features is not None else None
                img = None if hit else read_image(data, config.read_size(category))
            except Exception as e:  # an unreadable image is left out of the predictions and reported
                log.warning("task %s: cannot read its image (%s); no prediction", t["id"], e)
                self.unreadable.add(t["id"])
                continue
            task_ids.append(t["id"])
            categories.append(category)
            grids.append(grid)
            if hit:
                sizes.append(hit.size)
                feats.append(hit.features.float().view(grid.count, *hit.features.shape[-3:]))
                hits += 1
                continue
            sizes.append(img[1])
            feats.append(None)
            batch.append((len(feats) - 1, digest, grid, tile_tensors(img[0], config.tiling(category), config.image_size)))
            if sum(len(x) for *_, x in batch) >= self.batch_size:
                embed()
        if batch:
            embed()
        if features is not None:
            log.info("pool: %d of %d images' features from the feature cache", hits, len(tasks))
        return task_ids, sizes, categories, grids, torch.cat(feats) if feats else torch.zeros(0)  # type: ignore[arg-type]

    def add(self, model: AnomalyModel, tasks: list[dict]) -> list[int]:
        """Tasks imported since the pool was embedded: the new ones among ``tasks`` are embedded and
        scored under ``model``; returns the ids added. The cost is that of the new images, not of
        the pool (under another model than the last one asked for, ``refresh`` scores them all)."""
        known = set(self.index) | self.unreadable
        new = [t for t in tasks if t["id"] not in known]
        if not new:
            return []
        ids, sizes, categories, grids, feats = self._embed(model, new)
        if not ids:
            return []
        scores = self._scores if self._scores is not None and self._scores.model is model else None
        first = len(self.task_ids)
        self._join(ids, sizes, categories, grids, feats)
        if scores is not None:
            scores.grow(self.features)
            self._outcomes += [Outcome(0.0, 0.0, False, None)] * len(ids)
            self._predict(model, list(range(first, len(self.task_ids))))
        log.info("pool: %d new task(s) embedded and scored (%d in all)", len(ids), len(self.task_ids))
        return ids

    def refresh(self, model: AnomalyModel) -> int:
        """Bring every task's outcome up to date with ``model``: all of them for another model, else
        only the images its memory change moved and those of categories whose thresholds moved.
        Returns how many were scored again."""
        if not self.task_ids:
            return 0
        if self._scores is None or self._scores.model is not model:
            self._scores = model.pool_scores(self.features)
            moved = list(range(len(self.task_ids)))
            self._outcomes = [Outcome(0.0, 0.0, False, None)] * len(moved)
        else:
            moved = sorted({self.task_of_row[r] for r in self._scores.refresh().tolist()})
            old, new = self._calibration, model.calibration
            if old is not None and old != new:
                moved = sorted({*moved, *self._flipped(old, new)})
        self._calibration = Calibration(model.calibration.entries)  # a copy: the model's may be replaced
        self._predict(model, moved)
        if moved:
            log.info("pool: %d of %d images scored again", len(moved), len(self.task_ids))
        return len(moved)

    def _predict(self, model: AnomalyModel, positions: list[int]) -> None:
        """The outcomes of the tasks at these positions, from their current patch scores."""
        assert self._scores is not None
        for start in range(0, len(positions), 64):
            idx = positions[start:start + 64]
            rows = torch.tensor(self.rows(idx))
            patches = self._scores.of(rows)
            preds = model.predict_patches(patches, [self.categories[i] for i in idx], [self.grids[i] for i in idx])
            by_row, peaks = self._scores.defects(rows), patches.flatten(1).max(1).values
            ends = list(itertools.accumulate(self.grids[i].count for i in idx))
            for i, p, end in zip(idx, preds, ends, strict=True):
                mask = p.mask(*self.sizes[i])
                start = end - self.grids[i].count
                defect = by_row[start + int(peaks[start:end].argmax())]  # that of its most anomalous tile
                self._outcomes[i] = Outcome(p.score, p.normalised_score, p.decision == "anomalous",
                                            self.codec.encode(mask) if mask.any() else None, defect)

    def _flipped(self, old: Calibration, new: Calibration) -> list[int]:
        """Images whose outcome a change of thresholds moves: where only a category's image threshold
        moved (``Calibration.from_labels``), those scored between the two; where its mask edge moved
        (``Calibration.with_mask_levels``), those that show a mask; else all of the category."""
        out = []
        for i, (cat, o) in enumerate(zip(self.categories, self._outcomes, strict=True)):
            a, b = old.get(cat), new.get(cat)
            if a == b:
                continue
            if a is None or b is None or replace(a.as_fitted(), mask_level=None) != replace(b.as_fitted(), mask_level=None) \
                    or min(a.threshold, b.threshold) < o.score <= max(a.threshold, b.threshold) \
                    or a.mask_level != b.mask_level and o.anomalous:
                out.append(i)
        return out

    @functools.cached_property
    def index(self) -> dict[int, int]:
        """Task id -> its position in ``task_ids`` (the tasks whose image could be read; ``add`` appends)."""
        return {t: i for i, t in enumerate(self.task_ids)}

    @functools.cached_property
    def starts(self) -> list[int]:
        """Per task position, its first row of ``features`` (and the number of rows, last)."""
        return list(itertools.accumulate([0, *(g.count for g in self.grids)]))

    @functools.cached_property
    def task_of_row(self) -> list[int]:
        """Per row of ``features``, the position of its task."""
        return [i for i, g in enumerate(self.grids) for _ in range(g.count)]

    def rows(self, positions: list[int]) -> list[int]:
        """The rows of ``features`` (tiles) of the tasks at these positions, each task's consecutive."""
        return [r for i in positions for r in range(self.starts[i], self.starts[i + 1])]

    def embeddings(self, first: int = 0) -> torch.Tensor:
        """One vector per task from ``first`` on: the mean of its patch features (near-duplicate checks)."""
        means = self.features[self.starts[first]:].mean((2, 3))
        return torch.stack([m.mean(0) for m in means.split([g.count for g in self.grids[first:]])]) if len(means) else means

    def raw_scores(self, model: AnomalyModel, task_ids: list[int]) -> torch.Tensor:
        """Image scores of the given tasks under ``model`` (what thresholds are set on)."""
        self.refresh(model)
        return torch.tensor([self._outcomes[self.index[t]].score for t in task_ids])

    def maps_without(self, model: AnomalyModel, task_ids: list[int], groups: list[set[str]]) -> list[torch.Tensor]:
        """Smoothed anomaly maps of the given tasks (their tiles' stitched), each as if the named
        memory groups were not there."""
        self.refresh(model)
        positions = [self.index[t] for t in task_ids]
        patches = [self._scores.without(r, g) for i, g in zip(positions, groups, strict=True) for r in self.rows([i])]
        if not patches:
            return []
        maps = model.post.maps(torch.stack(patches))
        return model.post.stitched(model.post.image_scores(maps), maps, [self.grids[i] for i in positions])[1]

    def normalised_scores(self, model: AnomalyModel) -> list[float]:
        """Each task's normalised score under ``model``, in ``task_ids`` order."""
        self.refresh(model)
        return [o.normalised_score for o in self._outcomes]

    def predictions(self, model: AnomalyModel, score_of: dict[int, float] | None = None) -> list[dict]:
        """Label Studio predictions ({task, result, score, decision}). ``score_of`` (a policy's selection, scores in
        (0.5, 1]) puts those tasks first; every other task then gets half its normalised score, so it
        sorts below the selection and in the model's order: the ranked tab is the policy's order."""
        self.refresh(model)
        out = []
        for task_id, (w, h), o in zip(self.task_ids, self.sizes, self._outcomes, strict=True):
            score = o.normalised_score if score_of is None else score_of.get(task_id, 0.5 * o.normalised_score)
            out.append({"task": task_id, "score": score, "decision": ANOMALOUS if o.anomalous else NORMAL,
                        "result": prediction_regions(self.config, task_id, score, o.anomalous, o.rle, w, h, o.defect)})
        return out

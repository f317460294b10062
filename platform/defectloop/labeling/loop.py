"""One labeling project's active-learning loop.

    select (policy) -> predictions pushed, the selection first in "Most anomalous first"
    -> annotators label (in Label Studio) -> sync: masks into the abnormal bank, thresholds raised
       over the confirmed normals, a new served label
    -> re-prediction of the pool (scorer only) -> ... and a retraining every few rounds.

The model in the loop and the scorer service share the registry: each bank update is published
there, so the Ray Serve scorer hot-loads it while the loop re-predicts the pool itself from cached
features (cheaper than sending the pool through HTTP). With a scorer given, the loop then waits
until the scorer serves the new label (retrying while it is down) and reports whether it does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from defectloop.data import load_image
from defectloop.features.cache import FeatureCache
from defectloop.labeling.client import StudioClient
from defectloop.labeling.events import LabelEvent
from defectloop.labeling.feedback import Feedback, cells_at
from defectloop.labeling.policies import Candidate, Labeled, SelectionPolicy, rank_scores
from defectloop.labeling.predict import PoolPredictor
from defectloop.labeling.project import LabelingProject
from defectloop.labeling.scorer import ScorerClient, ScorerStatus
from defectloop.labeling.sync import Sync, SyncReport
from defectloop.models import AbnormalMemory
from defectloop.registry import Registry

log = logging.getLogger(__name__)


@dataclass
class FeedbackTiming:
    sync: SyncReport
    seconds: float  # bank update + publish + re-prediction + push + the scorer's hot reload
    scorer: ScorerStatus | None = None  # whether the scorer serves the new label (None: no change, or no scorer)


class LabelingLoop:
    def __init__(self, project: LabelingProject, registry: Registry, state_dir: str | Path, policy: SelectionPolicy,
                 batch: int = 20, cache_features: bool = False, scorer: ScorerClient | None = None,
                 scorer_wait_s: float = 120.0, feature_cache: str | None = None):
        self.project, self.registry, self.policy, self.batch = project, registry, policy, batch
        self.scorer, self.scorer_wait_s = scorer, scorer_wait_s
        self.state_dir = Path(state_dir)
        self.studio = StudioClient(project.url, project.token)
        self.model = registry.load()
        self.version = registry.resolve()
        self.fitted = registry.calibration(self.version)  # the thresholds recalibrate() starts from
        self.tasks = list(project.tasks())
        key, cfg = project.config.image_key, self.model.config
        self.predictor = PoolPredictor(self.model, self.tasks, lambda t: self.studio.fetch(t["data"][key], t["id"]),
                                       project.config, cache=self.state_dir / "pool_features.safetensors" if cache_features else None,
                                       features=FeatureCache.open(feature_cache, cfg.backbone, cfg.backbone_checkpoint,
                                                                  cfg.image_size) if feature_cache else None)
        self.embeddings = self.predictor.embeddings().numpy() if len(self.predictor.task_ids) else None
        self.feedback = Feedback(self.model, self.state_dir / "ledger.json",
                                 lambda v: load_image(self.studio.fetch(v.image, v.task_id)))
        self.sync = Sync(project, self.feedback, self.state_dir / "cursor.json", publish=self.publish)
        self.selected: list[int] = []
        self._pending = 0  # annotations applied since the last commit

    def publish(self) -> str:
        """A new update of the served version: its banks, and the thresholds under them."""
        assert isinstance(self.model, AbnormalMemory)  # only such a model's memory changes
        self.recalibrate()  # the bank moved the scores of the confirmed normals too
        return self.registry.publish_bank(self.model, self.version)

    def confirmed_labels(self) -> dict[int, int]:
        """Task id -> 1 (confirmed defective: a mask or a verdict) or 0 (confirmed normal); a task
        that annotators disagree on counts as defective."""
        out: dict[int, int] = {}
        for e in self.feedback.ledger.values():
            if e["kind"] in ("mask", "anomalous", "normal"):
                out[int(e["task_id"])] = max(out.get(int(e["task_id"]), 0), int(e["kind"] != "normal"))
        return out

    def recalibrate(self) -> bool:
        """The version's fitted thresholds, moved by the pool images annotators confirmed
        (``Calibration.from_labels``), with mask edges set by the confirmed masks
        (``Calibration.with_mask_levels``); returns whether the model's thresholds changed. Only a
        model with an abnormal memory has updates to carry them to the scorer."""
        if not isinstance(self.model, AbnormalMemory) or not self.fitted:
            return False
        labeled = self.labeled_maps()
        _, cats, maps, verdicts = labeled
        calibration = self.fitted
        if cats:
            calibration = self.fitted.from_labels(cats, self.model.post.image_scores(maps), verdicts,
                                                  self.model.config.threshold_quantile)
        calibration = calibration.with_mask_levels(*self.mask_evidence(labeled))
        if calibration == self.model.calibration:
            return False
        log.info("thresholds from the confirmed labels: %s; mask edges from the confirmed masks: %s", ", ".join(
            f"{c} {e.fitted:.3f} -> {e.threshold:.3f}" for c, e in sorted(calibration.entries.items()) if e.labels)
            or "as fitted", ", ".join(f"{c} {e.mask_level:.2f} of the rise ({e.mask_labels} masks)"
                                      for c, e in sorted(calibration.entries.items()) if e.mask_level is not None)
            or "as fitted")
        self.model.calibration = calibration
        return True

    def labeled_maps(self) -> tuple[list[int], list[str], list[torch.Tensor], torch.Tensor]:
        """Task ids, categories, anomaly maps (``maps_without_own``) and verdicts (True: defective)
        of the pool's confirmed labels: what thresholds and mask edges are set on, computed once."""
        index = self.predictor.index
        labels = {t: y for t, y in self.confirmed_labels().items() if t in index}
        tasks = sorted(labels)
        return (tasks, [self.predictor.categories[index[t]] for t in tasks], self.maps_without_own(tasks),
                torch.tensor([bool(labels[t]) for t in tasks], dtype=torch.bool))

    def mask_evidence(self, labeled: tuple[list[int], list[str], list[torch.Tensor], torch.Tensor] | None = None
                      ) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
        """Categories, anomaly maps and confirmed masks (at the maps' size) of the pool images with a
        confirmed mask, for the mask edges (``Calibration.with_mask_levels``); from ``labeled``
        (``labeled_maps``), which every confirmed mask is part of, where it is at hand."""
        tasks, cats, maps, _ = labeled or self.labeled_maps()
        cells = {int(e["task_id"]): e["mask_cells"] for e in self.feedback.ledger.values()
                 if e["kind"] == "mask" and e.get("mask_cells")}
        keep = [i for i, t in enumerate(tasks) if t in cells]
        return ([cats[i] for i in keep], [maps[i] for i in keep],
                [cells_at([cells[tasks[i]]], tuple(maps[i].shape[-2:]))[0] for i in keep])

    def labeled_scores(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Categories, image scores (``calibration_scores``) and verdicts (True: defective) of the
        pool's confirmed labels."""
        _, cats, maps, verdicts = self.labeled_maps()
        return cats, self.model.post.image_scores(maps), verdicts

    def calibration_scores(self, tasks: list[int]) -> torch.Tensor:
        """Image scores of labeled tasks, for thresholds (``maps_without_own``)."""
        return self.model.post.image_scores(self.maps_without_own(tasks))

    def maps_without_own(self, tasks: list[int]) -> list[torch.Tensor]:
        """Anomaly maps of labeled tasks, each scored without the memory its own labels added (its
        normal evidence, its mask's or verdict's abnormal entries): with it, a normal scores low, a
        defect high and its map shows its own mask back, and none of it shows how its look-alikes
        that nobody labeled yet score, which is what thresholds and mask edges are for."""
        return self.predictor.maps_without(self.model, tasks, self.own_groups(tasks))

    def own_groups(self, tasks: list[int]) -> list[set[str]]:
        """Per task, the memory groups its own labels added: its normal evidence, its masks' or
        verdicts' abnormal entries."""
        own: dict[int, set[str]] = {}
        for e in self.feedback.ledger.values():
            own.setdefault(int(e["task_id"]), set()).update(
                {self.feedback.normal_key(e["image"]), self.feedback.key(e["annotation_id"])})
        return [own.get(t, set()) for t in tasks]

    def label_thresholds(self) -> dict[str, dict]:
        """Categories whose thresholds the confirmed labels moved: {category: {fitted, threshold, labels}}."""
        return {c: {"fitted": e.fitted, "threshold": e.threshold, "labels": e.labels}
                for c, e in sorted(self.model.calibration.entries.items()) if e.labels}

    def mask_edges(self) -> dict[str, dict]:
        """Categories whose mask edge the confirmed masks set: {category: {level, masks}}."""
        return {c: {"level": e.mask_level, "masks": e.mask_labels}
                for c, e in sorted(self.model.calibration.entries.items()) if e.mask_level is not None}

    def abnormal_entries(self) -> int:
        return len(self.model.abnormal_bank) if isinstance(self.model, AbnormalMemory) else 0

    @property
    def label(self) -> str:
        return self.registry.label(self.version)

    def labeled(self) -> set[int]:
        return {int(e["task_id"]) for e in self.feedback.ledger.values()}

    def select(self) -> list[int]:
        """The next batch by the policy, among tasks nobody has labeled, pushed as predictions in that order."""
        norm = self.predictor.normalised_scores(self.model)
        done = self.labeled()
        candidates = [Candidate(t, norm[i], None if self.embeddings is None else self.embeddings[i],
                                self.predictor.categories[i]) for i, t in enumerate(self.predictor.task_ids) if t not in done]
        self.selected = self.policy.select(candidates, self.batch, self.labeled_candidates())
        self.push()
        return self.selected

    def add_new_tasks(self, ids: list[int] | None = None) -> list[int]:
        """Tasks imported into the project since the loop started (those ``ids`` name, as an import
        event does, else any: the project's task list is read): embedded (through the feature
        cache), scored and ranked with the pool; returns their ids."""
        known = set(self.predictor.index) | self.predictor.unreadable
        tasks = list(self.project.tasks([i for i in ids if i not in known] if ids is not None else None))
        first = len(self.predictor.task_ids)
        added = self.predictor.add(self.model, tasks)
        if added:
            joined = set(added)
            self.tasks += [t for t in tasks if t["id"] in joined]
            new = self.predictor.embeddings(first).numpy()
            self.embeddings = new if self.embeddings is None else np.concatenate([self.embeddings, new])
            self.select()
            log.info("%d task(s) imported since the start joined the pool and the ranking", len(added))
        return added

    def labeled_candidates(self) -> list[Labeled]:
        """The pool's confirmed labels as a policy learns from them, scored as the thresholds see them."""
        cats, scores, verdicts = self.labeled_scores()
        return [Labeled(c, self.model.calibration.normalise(s, c), v)
                for c, s, v in zip(cats, scores.tolist(), verdicts.tolist(), strict=True)]

    def warm_up(self) -> None:
        """Score the pool under the current model now (seconds for 1,000 images), so that the first
        annotation pays only for what it changes (measured: 26 s for the first, 2.5 s after)."""
        self.predictor.refresh(self.model)

    def push(self) -> None:
        """Predictions for the pool under the current label; the selection sorts first."""
        order = {} if self.policy.name == "top" else rank_scores(self.selected)
        self.project.push_predictions(self.predictor.predictions(self.model, order or None), self.version)

    def apply_feedback(self) -> FeedbackTiming:
        """Reconcile with Label Studio: every annotation the loop has not applied yet goes into the
        model; on a change, publish the bank (scorer hot-swap) and re-rank."""
        t0 = time.perf_counter()
        report = self.sync.run()
        published = self._after(report.applied, report.published)
        if published != report.published:
            report = replace(report, published=published)
        status = self.check_scorer() if published else None
        return FeedbackTiming(report, time.perf_counter() - t0, status)

    def apply(self, event: LabelEvent) -> int:
        """Apply one webhook event's annotations or deletions (``commit`` publishes); returns how many
        annotations it changed. A task the event names by id alone is read from Label Studio."""
        applied = 0
        for aid in event.deleted:
            applied += self.sync.forget(aid)
        for ann, task in event.annotations:
            if "data" not in task:
                task = {**task, "data": dict(self.project.ls.tasks.get(id=task["id"]).data)}
            applied += self.sync.apply(ann, task)
        self._pending += applied
        return applied

    def commit(self) -> str | None:
        """After ``apply``: publish the bank if it changed, save the cursor, re-rank; the published label."""
        published = self._after(self._pending, self.sync.commit())
        self._pending = 0
        return published

    def _after(self, applied: int, published: str | None) -> str | None:
        """Once annotations are applied (and the bank published if it changed): the confirmed
        labels recorded; thresholds they moved published even where the bank did not change; the
        pool re-ranked. Returns the label published, if any."""
        if applied:  # for the next retraining: the pool images confirmed so far
            self.registry.publish_labels(self.feedback.labeled_images())
            if not published and self.recalibrate():
                published = self.publish()
        if published:
            self.select()
        return published

    def check_scorer(self) -> ScorerStatus | None:
        """Wait (up to ``scorer_wait_s``) until the scorer serves the loop's label; None without a scorer."""
        return None if self.scorer is None else self.scorer.wait_for(self.label, self.scorer_wait_s)

    def reload(self) -> ScorerStatus | None:
        """After a retraining registered a new version: the loop moves to it (same backbone, same features)."""
        self.model = self.registry.load()
        self.version = self.registry.resolve()
        self.fitted = self.registry.calibration(self.version)
        self.feedback.model = self.model
        if self.recalibrate():  # the confirmed normals, under the new version's scores
            self.publish()
        self.push()
        return self.check_scorer()

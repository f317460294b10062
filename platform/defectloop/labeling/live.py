"""The labeling loop as a service: webhook events in; banks, predictions and retrainings out.

    /ls/webhook -> EventInbox (durable from the 2xx on)
      -> LiveLoop.step: read and check each event (schema, this project) -> LabelingLoop.apply
         (decode the mask, embed that image alone, bank delta keyed by annotation id and updated_at)
      -> commit: a new bank version in the registry (the scorer replicas swap the bank alone),
         the cursor saved, the pool re-ranked from cached features (only changed predictions written)
      -> only then are the events marked done: a crash at any step re-applies them, which changes
         nothing twice
    TASKS_CREATED (an import) -> the new tasks embedded, scored and ranked with the pool
    every ``reconcile_s`` and at start: the polling sync (what the webhooks missed), new tasks included
    N new confirmed masks, or START_TRAINING -> one retraining at a time (a RetrainRunner) ->
    the new version is served only if it is not worse on the held-back confirmed labels

``status`` is what ``GET /v1/banks`` and ``defectloop label status`` show.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np

from defectloop.labeling.events import InvalidEvent, parse_event
from defectloop.labeling.inbox import EventInbox
from defectloop.labeling.loop import FeedbackTiming, LabelingLoop
from defectloop.metrics import auroc
from defectloop.models import AbnormalMemory, held_back

log = logging.getLogger(__name__)


class RetrainRunner(Protocol):
    """Strategy: how a retraining runs (a Ray job, a child process). It registers a version that is
    not current yet, leaving the confirmed labels ``held_back`` out of its training."""

    hold_back: float

    def submit(self) -> str: ...

    def poll(self, job_id: str) -> tuple[str, str]:
        """("RUNNING" | "SUCCEEDED" | "FAILED", message)."""
        ...


@dataclass
class Retraining:
    """The last retraining: what asked for it, how it went, and why its version is served or not."""

    state: str = "idle"  # idle | running | promoted | kept | failed
    reason: str = ""
    job: str | None = None
    trigger: str = ""
    candidate: str | None = None
    served_auroc: float | None = None
    candidate_auroc: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    masks_at_start: int = 0  # confirmed masks when it started: the next one counts from here


class LiveLoop:
    def __init__(self, loop: LabelingLoop, inbox: EventInbox, runner: RetrainRunner | None = None,
                 retrain_after: int = 20, reconcile_s: float = 120.0, tolerance: float = 0.005):
        self.loop, self.inbox, self.runner = loop, inbox, runner
        self.retrain_after, self.reconcile_s, self.tolerance = retrain_after, reconcile_s, tolerance
        self.state_path = loop.state_dir / "live.json"
        saved = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self.retraining = Retraining(**saved.get("retraining", {}))
        if self.retraining.state == "running":  # the loop restarted while a job ran: follow it again
            log.info("following retraining %s again", self.retraining.job)
        self.train_requested = bool(saved.get("train_requested"))
        self.last_reconcile = 0.0
        self.started_at = time.time()
        self.last_status: dict = {}  # as of the end of the last turn: what other threads read
        self._saved: dict = {}  # what live.json holds
        self._lock = threading.Lock()

    # ----- events ---------------------------------------------------------------------------
    def step(self) -> int:
        """Apply the pending events (oldest first), commit, then mark them done; returns how many."""
        with self._lock:
            handled = []
            for event_id, body in self.inbox.pending():
                try:
                    event = parse_event(body)
                    if event.project is not None and event.project != self.loop.project.id:
                        raise InvalidEvent(f"project {event.project} is not this loop's ({self.loop.project.id})")
                except InvalidEvent as e:
                    log.warning("event %s rejected: %s", event_id, e)
                    self.inbox.reject(event_id, str(e))
                    continue
                if event.kind == "train":
                    self.train_requested = True
                elif event.kind == "tasks":  # an import: the new tasks join the pool (read from Label Studio)
                    self.loop.add_new_tasks(event.tasks)
                else:
                    self.loop.apply(event)
                handled.append(event_id)
            if handled:
                published = self.loop.commit()
                for event_id in handled:
                    self.inbox.done(event_id)
                if published:
                    log.info("%d event(s): bank published as %s", len(handled), published)
            return len(handled)

    def reconcile(self) -> FeedbackTiming:
        """The polling sync: whatever the webhooks missed (service or Label Studio down, lost events)."""
        with self._lock:
            self.loop.project.forget_predictions()  # Label Studio may have written some itself
            self.loop.add_new_tasks()  # imports whose TASKS_CREATED event never came
            timing = self.loop.apply_feedback()
            self.last_reconcile = time.monotonic()
            return timing

    # ----- retraining -----------------------------------------------------------------------
    def confirmed_masks(self) -> int:
        return sum(1 for e in self.loop.feedback.ledger.values() if e["kind"] == "mask")

    def retrain_due(self) -> str | None:
        if self.train_requested:
            return "Label Studio asked (START_TRAINING)"
        new = self.confirmed_masks() - self.retraining.masks_at_start
        if self.retrain_after and new >= self.retrain_after:
            return f"{new} new confirmed masks (threshold {self.retrain_after})"
        return None

    def follow_retraining(self) -> None:
        """Start a retraining when one is due, or finish the running one (judge its version)."""
        r = self.retraining
        if self.runner is None:
            return
        if r.state == "running":
            state, message = self.runner.poll(r.job)
            if state == "RUNNING":
                return
            with self._lock:
                if state == "SUCCEEDED":
                    self.judge()
                else:
                    r.state, r.reason = "failed", f"the retraining job failed: {message}; still serving {self.loop.version}"
                    log.error("%s", r.reason)
                r.finished_at = time.time()
            return
        why = self.retrain_due()
        if why:
            self.retraining = Retraining(state="running", trigger=why, started_at=time.time(),
                                         masks_at_start=self.confirmed_masks(), job=self.runner.submit())
            self.train_requested = False
            log.info("retraining %s started: %s", self.retraining.job, why)

    def judge(self) -> None:
        """Serve the new version only if it is not worse than the served one on held-back labels
        (image AUROC by normalised score, ``_auroc``)."""
        r, reg, loop = self.retraining, self.loop.registry, self.loop
        newer = [v for v in reg.ids() if v > loop.version]
        if not newer:
            r.state, r.reason = "failed", "the retraining job registered no new version"
            return
        r.candidate = newer[-1]
        candidate = reg.load(r.candidate)
        tasks, labels = self.held_back_labels()
        r.served_auroc = r.candidate_auroc = None
        if len(set(labels)) < 2:
            r.reason = (f"{len(labels)} held-back label(s), not of both kinds: nothing to judge on; "
                        f"{r.candidate} is served because its job succeeded")
        else:
            served = self._without(loop.model, tasks)
            r.served_auroc = self._auroc(served, tasks, labels)
            r.candidate_auroc = self._auroc(candidate, tasks, labels)
            if r.candidate_auroc < r.served_auroc - self.tolerance:
                r.state = "kept"
                r.reason = (f"{r.candidate} is worse on {len(labels)} held-back labels (image AUROC "
                            f"{r.candidate_auroc:.3f} against {r.served_auroc:.3f}): still serving {loop.version}")
                log.warning("%s", r.reason)
                return
            r.reason = (f"{r.candidate} is not worse on {len(labels)} held-back labels (image AUROC "
                        f"{r.candidate_auroc:.3f} against {r.served_auroc:.3f})")
        previous = loop.model
        reg.set_current(r.candidate)
        loop.reload()
        if isinstance(previous, AbnormalMemory) and isinstance(loop.model, AbnormalMemory):
            self._carry_held_back(previous)
        r.state = "promoted"
        log.info("%s", r.reason)

    def held_back_labels(self) -> tuple[list[int], list[int]]:
        """(task ids, 1 anomalous / 0 normal) of confirmed labels the retraining did not see."""
        fraction = self.runner.hold_back if self.runner else 0.0
        held = {int(e["task_id"]) for e in self.loop.feedback.ledger.values() if held_back(e["image"], fraction)}
        labels = self.loop.confirmed_labels()
        tasks = [t for t in sorted(labels) if t in self.loop.predictor.index and t in held]
        return tasks, [labels[t] for t in tasks]

    def _held_back_keys(self) -> set[str]:
        """The memory's keys for the held-back labels: their masks, and their images' normal evidence."""
        fraction = self.runner.hold_back if self.runner else 0.0
        held = [(aid, e["image"]) for aid, e in self.loop.feedback.ledger.items() if held_back(e["image"], fraction)]
        feedback = self.loop.feedback
        return {feedback.key(aid) for aid, _ in held} | {feedback.normal_key(image) for _, image in held}

    def _without(self, model, tasks: list[int]):
        """The served model without the held-back labels in its memory: judged as the candidate is."""
        if not isinstance(model, AbnormalMemory):
            return model
        held = self._held_back_keys()
        return model.with_memory(model.abnormal_bank.without(held), model.normal_evidence.without(held))

    def _auroc(self, model, tasks: list[int], labels: list[int]) -> float:
        """Image AUROC of the held-back labels by each model's normalised score: the order the queue
        shows, comparable across categories. Raw scores are not (a category's normals may score
        above another's defects), so over several categories their AUROC judged how the scales of
        the categories happened to line up as much as how each ranks its own images."""
        predictor = self.loop.predictor
        positions = [predictor.index[t] for t in tasks]
        rows = predictor.rows(positions)
        scores, _ = model.score_images(predictor.features[rows], [predictor.grids[i] for i in positions])
        normalised = [model.calibration.normalise(s, predictor.categories[i])
                      for s, i in zip(scores.tolist(), positions, strict=True)]
        return auroc(np.array(normalised), np.array(labels))

    def _carry_held_back(self, previous: AbnormalMemory) -> None:
        """The held-back labels were not trained on, but belong in the served memory: their masks and
        normal evidence copied over (same backbone, same features) and published."""
        model = self.loop.model
        held = self._held_back_keys()
        added = 0
        for old, new in ((previous.abnormal_bank, model.abnormal_bank), (previous.normal_evidence, model.normal_evidence)):
            feats, group, provs = old.tensors()
            for i, p in enumerate(provs):
                if p.annotation_id in held and p.annotation_id not in new:
                    new.add(p, feats[group == i])
                    added += 1
        if added:
            self.loop.publish()
            self.loop.select()

    # ----- the service ----------------------------------------------------------------------
    def status(self) -> dict:
        """What /v1/banks and `defectloop label status` show of the loop."""
        quarantined = [{"annotation": aid, **q} for aid, q in sorted(self.loop.sync.quarantined.items())]
        quarantined += [{"event": r["event"], "reason": r["reason"]} for r in self.inbox.rejected()]
        return {"model_version": self.loop.version, "bank_label": self.loop.label,
                "pending_events": len(self.inbox.pending()), "quarantined": quarantined,
                "retraining": asdict(self.retraining), "confirmed_masks": self.confirmed_masks(),
                "labeled_tasks": len(self.loop.labeled()), "label_thresholds": self.loop.label_thresholds(),
                "mask_edges": self.loop.mask_edges(),
                "pid": os.getpid(), "started_at": self.started_at}

    def save(self) -> None:
        """Keep the retraining's state across restarts, and the status others read (written only
        when it changed: the loop turns four times a second)."""
        self.last_status = self.status()
        state = {"retraining": asdict(self.retraining), "train_requested": self.train_requested, "status": self.last_status}
        if state == self._saved:
            return
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_path)
        self._saved = state

    def run(self, stop: threading.Event, poll_s: float = 0.25) -> None:
        """Until ``stop``: events as they arrive, the reconciliation now and then, retrainings."""
        self.loop.warm_up()
        while not stop.is_set():
            try:
                if time.monotonic() - self.last_reconcile >= self.reconcile_s:
                    self.reconcile()
                self.step()
                self.follow_retraining()
                self.save()
            except Exception:  # Label Studio or the store down: report, and try again on the next turn
                log.exception("live loop: this turn failed; the next one tries again")
                stop.wait(min(5.0, 10 * poll_s))
            stop.wait(poll_s)

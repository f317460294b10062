"""Polling sync with Label Studio: the safety net under webhooks, and idempotent.

Each run lists the project's annotations, applies those that are new or changed since the last
run (by ``updated_at``), treats those that disappeared as deleted, publishes the abnormal bank if
it changed (a new served label, so the scorer hot-loads it and Label Studio re-predicts) and only
then saves its cursor. A run that fails half-way (Label Studio down) saves nothing, and the next
run applies the same annotations again, which changes nothing twice: no annotation is lost or
counted twice.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from defectloop.labeling.feedback import Feedback, Verdict, read_annotation
from defectloop.labeling.project import LabelingProject

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncReport:
    applied: int  # annotations applied this run (new, edited or deleted)
    annotations: int  # annotations in the project now
    bank_changed: bool
    published: str | None  # the new served label, when the bank changed


class Sync:
    def __init__(self, project: LabelingProject, feedback: Feedback, cursor: str | Path,
                 publish: Callable[[], str] | None = None):
        self.project = project
        self.feedback = feedback
        self.cursor_path = Path(cursor)
        self.publish = publish
        self.seen: dict[str, str] = json.loads(self.cursor_path.read_text()) if self.cursor_path.exists() else {}

    def run(self) -> SyncReport:
        now: dict[str, str] = {}
        applied, changed = 0, False
        for task in self.project.tasks():
            for ann in task["annotations"]:
                aid = str(ann["id"])
                stamp = str(ann.get("updated_at") or ann.get("created_at") or "")
                now[aid] = stamp
                if self.seen.get(aid) == stamp:
                    continue
                changed |= self.feedback.apply(read_annotation(ann, task, self.project.config))
                applied += 1
        for aid in sorted(set(self.seen) - set(now)):  # deleted in Label Studio
            changed |= self.feedback.apply(Verdict(aid, -1, "", "", "deleted"))
            applied += 1
        published = self.publish() if changed and self.publish else None
        tmp = self.cursor_path.with_suffix(".tmp")
        self.cursor_path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(now))
        os.replace(tmp, self.cursor_path)
        self.seen = now
        if applied:
            log.info("sync: %d annotation change(s) applied, bank %s", applied,
                     f"published as {published}" if published else "unchanged")
        return SyncReport(applied, len(now), changed, published)

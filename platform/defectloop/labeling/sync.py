"""Annotations into the model, exactly once each: the one path for webhook events and the polling
reconciliation alike.

``apply`` takes one annotation (API or webhook form) and skips it when its ``updated_at`` is the
one already applied (a duplicate webhook, or the reconciliation meeting what a webhook brought).
An annotation that cannot be read (a truncated brush RLE, a mask of the wrong size, a corrupt
image) is quarantined with its reason and the cursor moves past it, so it never blocks the next
ones; an edit of it is tried again. Label Studio being down is not the annotation's fault: that
error propagates and nothing is recorded, so the same annotation is applied on the next try.

``run`` is the reconciliation: it lists the project's annotations, applies those that are new or
changed, treats those that disappeared as deleted. ``commit`` publishes the bank if it changed (a
new bank version, which the scorer hot-swaps) and only then saves the cursor: a crash between
the two re-applies annotations on restart, which changes nothing twice (entries are keyed by
annotation id).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
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
    quarantined: int = 0  # annotations that could not be read, in all


def stamp(annotation: dict) -> str:
    """What changes whenever an annotation is edited: its ``updated_at``, in one form whether it came
    as Label Studio's ISO text (webhook, API) or as a datetime (SDK objects)."""
    value = annotation.get("updated_at") or annotation.get("created_at") or ""
    try:
        when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC).isoformat()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class Sync:
    def __init__(self, project: LabelingProject, feedback: Feedback, cursor: str | Path,
                 publish: Callable[[], str] | None = None):
        self.project = project
        self.feedback = feedback
        self.cursor_path = Path(cursor)
        self.quarantine_path = self.cursor_path.with_name("quarantine.json")
        self.publish = publish
        self.seen: dict[str, str] = _read_json(self.cursor_path)  # annotation id -> stamp applied
        self.quarantined: dict[str, dict] = _read_json(self.quarantine_path)  # annotation id -> why
        self._changed = False

    def apply(self, annotation: dict, task: dict) -> bool:
        """Apply one annotation unless this version of it was applied already; True when it was."""
        aid, st = str(annotation["id"]), stamp(annotation)
        if self.seen.get(aid) == st:
            return False
        try:
            self._changed |= self.feedback.apply(read_annotation(annotation, task, self.project.config))
            self.quarantined.pop(aid, None)
        except (ValueError, KeyError, TypeError, IndexError) as e:  # the annotation itself cannot be read
            reason = f"{type(e).__name__}: {e}"
            self.quarantined[aid] = {"task": task.get("id"), "updated_at": st, "reason": reason, "at": time.time()}
            log.warning("annotation %s of task %s quarantined: %s", aid, task.get("id"), reason)
        self.seen[aid] = st
        return True

    def forget(self, annotation_id: str) -> bool:
        """An annotation deleted in Label Studio; True when it was known."""
        aid = str(annotation_id)
        known = aid in self.seen or aid in self.feedback.ledger
        self._changed |= self.feedback.apply(Verdict(aid, -1, "", "", "deleted"))
        self.seen.pop(aid, None)
        self.quarantined.pop(aid, None)
        return known

    def commit(self) -> str | None:
        """Publish the bank if it changed, then save the cursor; returns the published label."""
        published = self.publish() if self._changed and self.publish else None
        self._changed = False
        _write_json(self.cursor_path, self.seen)
        _write_json(self.quarantine_path, self.quarantined)
        return published

    def run(self) -> SyncReport:
        """Reconcile with the project: whatever the webhooks missed, and deletions."""
        now: set[str] = set()
        applied = 0
        changed_before = self._changed
        for task in self.project.tasks():
            for ann in task["annotations"]:
                now.add(str(ann["id"]))
                applied += self.apply(ann, task)
        for aid in sorted(set(self.seen) - now):  # deleted in Label Studio
            applied += self.forget(aid)
        changed = self._changed or changed_before
        published = self.commit()
        if applied:
            log.info("sync: %d annotation change(s) applied, bank %s", applied,
                     f"published as {published}" if published else "unchanged")
        return SyncReport(applied, len(now), changed, published, len(self.quarantined))

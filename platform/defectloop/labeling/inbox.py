"""A durable spool of Label Studio events, so that a webhook request only has to enqueue.

Each event is one JSON file, written under a temporary name and renamed into ``pending/``;
whoever applies the feedback moves it to ``done/`` (or to ``rejected/``, with the reason, when it
cannot be applied at all). Events survive a restart of the service, and
because the feedback is idempotent (keyed by annotation id) an event delivered twice is harmless.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path


class EventInbox:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.pending_dir = self.folder / "pending"
        self.done_dir = self.folder / "done"
        self.rejected_dir = self.folder / "rejected"
        for d in (self.pending_dir, self.done_dir, self.rejected_dir):
            d.mkdir(parents=True, exist_ok=True)

    def put(self, event: dict) -> str:
        """Store an event; returns its id (time-ordered)."""
        event_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        tmp = self.folder / f".{event_id}.tmp"
        tmp.write_text(json.dumps(event))
        os.replace(tmp, self.pending_dir / f"{event_id}.json")
        return event_id

    def pending(self) -> list[tuple[str, dict]]:
        """Events not yet applied, oldest first."""
        out = []
        for p in sorted(self.pending_dir.glob("*.json")):
            try:
                out.append((p.stem, json.loads(p.read_text())))
            except (OSError, json.JSONDecodeError):  # removed meanwhile, or never fully written
                continue
        return out

    def done(self, event_id: str) -> None:
        src = self.pending_dir / f"{event_id}.json"
        if src.exists():
            os.replace(src, self.done_dir / src.name)

    def reject(self, event_id: str, reason: str) -> None:
        """Set an event aside with the reason it cannot be applied (listed by ``rejected``)."""
        src = self.pending_dir / f"{event_id}.json"
        if src.exists():
            (self.rejected_dir / f"{event_id}.reason").write_text(reason)
            os.replace(src, self.rejected_dir / src.name)

    def rejected(self) -> list[dict]:
        """Events set aside: {"event", "reason"}, oldest first."""
        return [{"event": p.stem, "reason": p.read_text()} for p in sorted(self.rejected_dir.glob("*.reason"))]

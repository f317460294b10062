"""A durable spool of Label Studio events, so that a webhook request only has to enqueue.

Each event is one JSON file, written under a temporary name and renamed into ``pending/``;
whoever applies the feedback moves it to ``done/`` (or to ``rejected/``, with the reason, when it
cannot be applied at all). Events survive a restart of the service. An event delivered twice
(same action, annotations and ``updated_at``) is stored once; were it applied twice, the feedback
is idempotent (keyed by annotation id) anyway.
"""

from __future__ import annotations

import hashlib
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
        self.keys_dir = self.folder / "keys"  # identities of the events stored: a duplicate is not stored again
        for d in (self.pending_dir, self.done_dir, self.rejected_dir, self.keys_dir):
            d.mkdir(parents=True, exist_ok=True)

    def put(self, event: dict, identity: str | None = None) -> str:
        """Store an event unless one of the same ``identity`` was stored before; returns its id
        (time-ordered; for a duplicate, the id of the one stored first)."""
        event_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        if identity is not None:
            key = self.keys_dir / hashlib.sha256(identity.encode()).hexdigest()
            try:
                fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL)  # one writer wins, across replicas
            except FileExistsError:
                return key.read_text() or event_id
            with os.fdopen(fd, "w") as fh:
                fh.write(event_id)
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

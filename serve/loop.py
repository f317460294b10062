"""The live labeling loop as a Ray Serve deployment, beside the scorer in one application.

One replica runs ``LiveLoop`` (labeling/live.py) in a background thread: it drains the event
inbox the scorer's ``/ls/webhook`` writes, publishes bank versions the scorer replicas swap in,
re-ranks the Label Studio pool and starts retrainings (Ray jobs when a dashboard address is set,
else child processes). Serve restarts the replica if it dies; the inbox, the cursor and the
registry let the new one carry on where the old one stopped.
"""

from __future__ import annotations

import logging
import os
import threading

import torch
from ray import serve

from defectloop.labeling.inbox import EventInbox
from defectloop.labeling.live import LiveLoop
from defectloop.labeling.workspace import Workspace, open_loop
from defectloop.serve.settings import ServeSettings
from defectloop.workers.jobs import ProcessRunner, RayJobRunner

log = logging.getLogger(__name__)


def build_live_loop(settings: ServeSettings) -> LiveLoop:
    """The loop of the labeling setup in ``settings.loop_state``, with its retraining runner."""
    if not settings.loop_state:
        raise ValueError("no labeling setup: set loop_state (DEFECTLOOP_LOOP_STATE)")
    if not settings.label_studio_token:
        raise ValueError("the live loop needs Label Studio's token (LABEL_STUDIO_API_KEY)")
    ws = Workspace.load(settings.loop_state)
    loop = open_loop(settings.loop_state, settings.label_studio_token, ws, watch_scorer=False)
    runner = None
    if ws.data:
        if settings.ray_dashboard:
            runner = RayJobRunner(ws.registry, ws.data, settings.ray_dashboard, hold_back=settings.hold_back)
        else:
            runner = ProcessRunner(ws.registry, ws.data, f"{settings.loop_state}/retrain-logs", settings.hold_back)
    return LiveLoop(loop, EventInbox(settings.inbox_dir()), runner, settings.retrain_after, settings.reconcile_s)


@serve.deployment(num_replicas=1, max_ongoing_requests=16, health_check_period_s=10, graceful_shutdown_timeout_s=20)
class LoopService:
    def __init__(self, **settings):
        self.settings = ServeSettings.load(**settings)
        torch.set_num_threads(self.settings.threads or os.cpu_count() or 1)
        self.live = build_live_loop(self.settings)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.live.run, args=(self._stop,), name="defectloop-live", daemon=True)
        self._thread.start()
        log.info("live loop: project %s, model %s", self.live.loop.project.id, self.live.loop.label)

    def status(self) -> dict:
        """The loop as of its last turn (pending events, quarantine, retraining, pid)."""
        return self.live.last_status or {"starting": True, "pid": os.getpid()}

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the live loop's thread has stopped")

    def __del__(self) -> None:
        self._stop.set()

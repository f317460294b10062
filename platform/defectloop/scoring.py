"""Scoring for services: the model in force, swapped without dropping requests, and its outputs.

:class:`ModelHandle` keeps the model a service answers with. It follows a registry (the current
version and that version's abnormal-bank updates) or holds one version directory; ``refresh``
loads a newer one beside the old and swaps a single reference, so a request in flight finishes
on the model it started with. Pure Python and torch: Ray Serve, the CLI and tests share it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from defectloop.models import AnomalyModel, Prediction, load_model
from defectloop.registry import Registry, resolve_model_dir
from defectloop.store import open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """One loaded model and the label it answers under (``v0003`` or ``v0003-b0002``)."""

    model: AnomalyModel
    label: str
    loaded_at: float


@dataclass(frozen=True)
class Scored:
    """One image's prediction, and the served model that made it."""

    prediction: Prediction
    served: Served


class ModelHandle:
    """The model a service scores with; ``location`` is a registry or a model version (local or s3://)."""

    def __init__(self, location: str | os.PathLike, version: str | None = None, device: str = "cpu"):
        self.location = str(location)
        self.device = torch.device(device)  # where the backbone runs; banks and heads stay on the CPU
        self._registry: Registry | None = None
        self.version = version  # pinned version, or None to follow the registry's current one
        self._served: Served | None = None
        self._lock = threading.Lock()  # one reload at a time; readers never wait for it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    @property
    def registry(self) -> Registry | None:
        if self._registry is None and Registry.is_registry(self.location):
            self._registry = Registry(self.location)
        return self._registry

    def wanted(self) -> str:
        """The label that should be served now (cheap: reads two small pointer files)."""
        reg = self.registry
        if reg is None:
            if not open_store(self.location).exists("config.json"):
                raise FileNotFoundError(f"{self.location} is neither a registry nor a model version directory")
            return Path(self.location.rstrip("/")).name
        return reg.label(self.version)

    @property
    def served(self) -> Served:
        served = self._served
        if served is None:
            self.refresh()
            served = self._served
        assert served is not None
        return served

    def refresh(self) -> bool:
        """Load the wanted model if it differs from the served one; True when it was swapped in.

        A failure (a half-copied version, a corrupt bank) keeps the current model and is logged.
        """
        with self._lock:
            try:
                label = self.wanted()
                if self._served is not None and self._served.label == label:
                    return False
                t0 = time.perf_counter()
                reg = self.registry
                model = reg.load(self.version) if reg is not None else load_model(resolve_model_dir(self.location))
                model.eval()
                model.embedder.to(self.device)
                previous = self._served
                self._served = Served(model, label, time.time())
                self.last_error = None
                log.info("serving %s (was %s), loaded in %.1fs", label, previous.label if previous else "nothing",
                         time.perf_counter() - t0)
                return True
            except Exception as e:
                self.last_error = f"{type(e).__name__}: {e}"
                if self._served is None:
                    raise
                log.error("keeping %s: could not load the new model: %s", self._served.label, self.last_error)
                return False

    def watch(self, poll_s: float) -> None:
        """Poll the registry in a daemon thread and swap in new versions/banks as they appear."""
        self.stop()
        self._stop = threading.Event()

        def loop(stop: threading.Event) -> None:
            while not stop.wait(poll_s):
                try:
                    self.refresh()
                except Exception:  # refresh logs; the watcher must survive
                    log.exception("registry watch")

        self._thread = threading.Thread(target=loop, args=(self._stop,), name="defectloop-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def score(self, images: list[torch.Tensor], categories: Sequence[str | None]) -> list[Scored]:
        """Score preprocessed images (3 x S x S in [0, 1]) as one batch with the model in force."""
        served = self.served
        feats = served.model.embedder(torch.stack(images).to(self.device)).float().cpu()
        return [Scored(p, served) for p in served.model.predict_features(feats, categories)]

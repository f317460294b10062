"""Scoring for services: the model in force, swapped without dropping requests, and its outputs.

:class:`ModelHandle` keeps the model a service answers with. It follows a registry (the current
version and that version's abnormal-bank updates) or holds one version directory; ``refresh``
loads a newer one beside the old and swaps a single reference, so a request in flight finishes
on the model it started with. A new bank of the served version swaps the bank alone. Pure Python and torch: Ray Serve, the CLI and tests share it.
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

from defectloop.data.tiles import Grid
from defectloop.models import AbnormalMemory, AnomalyModel, Prediction, load_model
from defectloop.registry import TRAINED_BANK, Registry, resolve_model_dir
from defectloop.store import open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """One loaded model: its version and the abnormal-bank update in force (``TRAINED_BANK``: none)."""

    model: AnomalyModel
    version: str
    bank: str
    loaded_at: float

    @property
    def label(self) -> str:
        """What it is called in one word: ``v0003``, or ``v0003-b0002`` with a bank update."""
        return self.version if self.bank == TRAINED_BANK else f"{self.version}-{self.bank}"


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

    def wanted(self) -> tuple[str, str]:
        """(version, bank) that should be served now (cheap: reads two small pointer files)."""
        reg = self.registry
        if reg is None:
            if not open_store(self.location).exists("config.json"):
                raise FileNotFoundError(f"{self.location} is neither a registry nor a model version directory")
            return Path(self.location.rstrip("/")).name, TRAINED_BANK
        version = reg.resolve(self.version)
        return version, reg.bank_version(version)

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

        A new bank of the served version swaps the bank alone (backbone and head stay loaded). A
        failure (a half-copied version, a corrupt bank) keeps the current model and is logged.
        """
        with self._lock:
            try:
                version, bank = self.wanted()
                previous = self._served
                if previous is not None and (previous.version, previous.bank) == (version, bank):
                    return False
                t0 = time.perf_counter()
                self._served = Served(self._load(version, bank, previous), version, bank, time.time())
                self.last_error = None
                log.info("serving %s (was %s), loaded in %.2fs", self._served.label,
                         previous.label if previous else "nothing", time.perf_counter() - t0)
                return True
            except Exception as e:
                self.last_error = f"{type(e).__name__}: {e}"
                if self._served is None:
                    raise
                log.error("keeping %s: could not load the new model: %s", self._served.label, self.last_error)
                return False

    def _load(self, version: str, bank: str, previous: Served | None) -> AnomalyModel:
        reg = self.registry
        if reg is None:
            model = load_model(resolve_model_dir(self.location))
        elif (previous is not None and previous.version == version and bank != TRAINED_BANK
              and isinstance(previous.model, AbnormalMemory)):
            return reg.load_update(version, bank, previous.model)
        else:
            model = reg.load(version)
        model.eval()
        model.embedder.to(self.device)
        return model

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

    def score(self, images: list[torch.Tensor], categories: Sequence[str | None], grids: Sequence[Grid] | None = None,
              batch_size: int = 64) -> list[Scored]:
        """Score preprocessed images (3 x S x S in [0, 1]), or their tiles (T x 3 x S x S, see
        ``features.tile_tensors``), as one batch with the model in force; the backbone takes at
        most ``batch_size`` tiles at a time (memory stays bounded whatever the images' sizes).
        ``grids``: the grid each image was cut into (default: its category's under the model in
        force; a caller that cut the tiles before a version swap says which it used)."""
        served = self.served
        stacks = [t if t.dim() == 4 else t[None] for t in images]
        grids = grids or [served.model.config.grid(c) for c in categories]
        for t, g, c in zip(stacks, grids, categories, strict=True):  # before the backbone runs
            if len(t) != g.count:
                raise ValueError(f"category {c!r}: {len(t)} tiles given for a grid of {g.rows} x {g.cols}")
        inputs = torch.cat(stacks)
        feats = torch.cat([served.model.embedder(inputs[i:i + batch_size].to(self.device)).float().cpu()
                           for i in range(0, len(inputs), batch_size)])
        preds = served.model.predict_features(feats, categories, grids)
        return [Scored(p, served) for p in preds]

"""The registry of model versions, on a store (local folder or S3).

Layout (the same on both backends; keys are relative to the registry's root):

    versions/<id>/...              files of a model version (see models.base)
    versions/<id>/version.json     written LAST: a version without it does not exist for readers
    claims/<id>                    written first, only if absent: how concurrent writers agree on ids
    CURRENT, history.json          the id being served; previous CURRENT values, for rollback
    banks/<id>/bNNNN/...           updates of a version by the labels confirmed since its training: the
                                   abnormal bank, the confirmed normals' evidence, and the thresholds
                                   they raised
    banks/<id>/CURRENT             the bank in force for that version
    labels/normal.json             pool images annotators confirmed normal (read by the retraining)
    labels/defective.json          pool images annotators confirmed defective (held back: they judge its head)

The commit markers and pointers are written after what they point to, so a reader never sees half
a version; a failed save leaves the registry as it was. A version never changes once committed:
annotators' new masks reach a served model as a new bank of that version, and the served label
(``v0003-b0002``) changes with it, so Label Studio re-predicts. Reading an S3 version downloads it
once into a local cache (versions are immutable, so the cache stays valid).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from defectloop.models import AbnormalMemory, AnomalyModel, Calibration, load_model
from defectloop.store import LocalStore, S3Config, cache_path, is_s3, local_copy, open_store

log = logging.getLogger(__name__)

#: the bank_version of a version served with the abnormal bank it was trained with
TRAINED_BANK = "b0000"


def save_model(model: AnomalyModel, location: str | os.PathLike, files: dict[str, str] | None = None) -> str:
    """Write a model version folder (``--out``) to a local path or S3; config.json goes last."""
    if not is_s3(location):
        folder = model.save(location)
        for name, text in (files or {}).items():
            (folder / name).write_text(text)
        return str(folder)
    store = open_store(location)
    with tempfile.TemporaryDirectory(prefix="defectloop-save-") as tmp:
        model.save(tmp)
        for name, text in (files or {}).items():
            (Path(tmp) / name).write_text(text)
        store.upload_dir(Path(tmp), "", last=("config.json",))
    return store.uri


@dataclass(frozen=True)
class VersionInfo:
    id: str
    kind: str
    created: float
    current: bool


class Registry:
    """Versions of one model line, with a current pointer, rollback and bank updates."""

    def __init__(self, location: str | os.PathLike, s3: S3Config | None = None):
        self.location = str(location)
        self.store = open_store(location, s3)

    @staticmethod
    def is_registry(location: str | os.PathLike) -> bool:
        """Whether a location holds a registry (any version, claim or pointer)."""
        if not is_s3(location):
            return (Path(location) / "versions").is_dir()
        store = open_store(location)
        return bool(store.keys("versions")) or store.exists("CURRENT")

    # ----- versions ------------------------------------------------------------------------
    def ids(self) -> list[str]:
        """Committed versions, oldest first."""
        return sorted(k.split("/")[1] for k in self.store.keys("versions") if k.endswith("/version.json")
                      and k.count("/") == 2)

    def _check(self, version: str) -> str:
        if not self.store.exists(f"versions/{version}/version.json"):
            raise LookupError(f"registry {self.location} has no version {version!r} (have: {', '.join(self.ids())})")
        return version

    def current(self) -> str | None:
        return (self.store.read_text("CURRENT") or "").strip() or None

    def resolve(self, version: str | None = None) -> str:
        version = version or self.current()
        if version is None:
            raise LookupError(f"registry {self.location} has no current version")
        return self._check(version)

    def path(self, version: str | None = None) -> Path:
        """A local folder with the version's files (a cached download for S3)."""
        version = self.resolve(version)
        return local_copy(self.store, f"versions/{version}", "version.json")

    def _history(self) -> list[str]:
        return json.loads(self.store.read_text("history.json", "[]"))

    def set_current(self, version: str) -> None:
        self._check(version)
        previous = self.current()
        if previous == version:
            return
        if previous:
            self.store.write("history.json", json.dumps([*self._history(), previous]).encode())
        self.store.write("CURRENT", version.encode())
        log.info("registry %s: current %s -> %s", self.location, previous, version)

    promote = set_current

    def rollback(self) -> str:
        """Make the previously current version current again."""
        history = self._history()
        if not history:
            raise LookupError("nothing to roll back to")
        version = history[-1]
        self.store.write("CURRENT", version.encode())
        self.store.write("history.json", json.dumps(history[:-1]).encode())
        return version

    def _claim(self, folder: str, prefix: str) -> str:
        """The next free id ``<prefix>NNNN`` under ``folder``, claimed exclusively."""
        taken = {k.split("/")[-1] for k in self.store.keys(folder)}
        n = 1 + max((int(t[len(prefix):]) for t in taken if t.startswith(prefix) and t[len(prefix):].isdigit()),
                    default=0)
        token = json.dumps({"by": uuid.uuid4().hex, "time": time.time()}).encode()
        while not self.store.create(f"{folder}/{prefix}{n:04d}", token):
            n += 1
        return f"{prefix}{n:04d}"

    def register(self, model: AnomalyModel, metrics: dict | None = None, make_current: bool = True,
                 files: dict[str, str] | None = None) -> str:
        """Save a model as a new version (committed last) and, by default, make it current."""
        with tempfile.TemporaryDirectory(prefix="defectloop-version-") as tmp:
            folder = model.save(tmp)  # before claiming anything: a model that cannot be saved costs nothing
            if metrics is not None:
                (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
            for name, text in (files or {}).items():
                (folder / name).write_text(text)
            (folder / "version.json").write_text(json.dumps({"kind": model.kind, "created": time.time()}))
            version = self._claim("claims", "v")
            try:
                self.store.upload_dir(folder, f"versions/{version}", last=("version.json",))
            except BaseException:
                try:
                    self.store.delete(f"versions/{version}")
                except Exception:  # the store is down: gc removes the leftovers later
                    log.warning("could not clean up the failed version %s", version)
                raise
        if make_current:
            self.set_current(version)
        return version

    def attach(self, version: str, name: str, text: str) -> None:
        """Add a report (metrics.json, fit.json) to a committed version; the model itself never changes."""
        self._check(version)
        self.store.write(f"versions/{version}/{name}", text.encode())
        if not isinstance(self.store, LocalStore):
            shutil.rmtree(cache_path(self.store, f"versions/{version}"), ignore_errors=True)

    def info(self, version: str | None = None) -> dict:
        """version.json plus the attached reports, read without downloading the model."""
        version = self.resolve(version)
        out: dict = {"id": version, "current": version == self.current(), "bank": self.bank(version)}
        out.update(json.loads(self.store.read_text(f"versions/{version}/version.json", "{}")))
        for name in ("metrics.json", "fit.json"):
            text = self.store.read_text(f"versions/{version}/{name}")
            if text:
                out[name.removesuffix(".json")] = json.loads(text)
        return out

    def list(self) -> list[VersionInfo]:
        cur = self.current()
        out = []
        for v in self.ids():
            meta = json.loads(self.store.read_text(f"versions/{v}/version.json", "{}"))
            out.append(VersionInfo(v, meta.get("kind", "?"), meta.get("created", 0.0), v == cur))
        return out

    def gc(self, keep: int, stale_s: float = 3600.0) -> list[str]:
        """Delete all but the ``keep`` newest versions (never the current one or the rollback target),
        and leftovers of saves that failed more than ``stale_s`` ago. Returns what was deleted."""
        ids = self.ids()
        protect = set(ids[-keep:] if keep > 0 else []) | {self.current()} | set(self._history()[-1:])
        doomed = [v for v in ids if v not in protect]
        committed = set(ids)
        for key in self.store.keys("claims"):
            v = key.split("/")[-1]
            if v not in committed:
                claim = json.loads(self.store.read_text(key, "{}") or "{}")
                if time.time() - claim.get("time", 0) > stale_s:
                    doomed.append(v)
        for v in doomed:
            self.store.delete(f"versions/{v}")
            self.store.delete(f"banks/{v}")
        history = [v for v in self._history() if v not in doomed]
        if history != self._history():
            self.store.write("history.json", json.dumps(history).encode())
        return doomed

    def load(self, version: str | None = None) -> AnomalyModel:
        """A version's model with its bank update in force (if any)."""
        path = self.path(version)
        model = load_model(path)
        bank = self.bank(path.name)
        if bank and isinstance(model, AbnormalMemory):
            return self.load_update(path.name, bank, model)  # type: ignore[return-value]
        return model

    def load_update(self, version: str, bank: str, model: AbnormalMemory) -> AbnormalMemory:
        """``model`` (of ``version``, loaded) under one of its bank updates: a twin reading the
        update's banks and thresholds (the version's own where the update has none)."""
        folder = local_copy(self.store, f"banks/{version}/{bank}", "abnormal_bank.json")
        twin = copy.copy(model)
        twin.load_memory(folder)  # new banks on the twin: ``model`` keeps its own
        own = folder / "calibration.json"
        twin.calibration = Calibration.load(own) if own.is_file() else self.calibration(version)  # type: ignore[attr-defined]
        return twin

    def calibration(self, version: str | None = None) -> Calibration:
        """A version's thresholds as fitted (a bank update may have raised some: see load_update)."""
        return Calibration.loads(self.store.read_text(f"versions/{self.resolve(version)}/calibration.json", "{}"))

    # ----- abnormal-bank updates ------------------------------------------------------------
    def bank(self, version: str | None = None) -> str | None:
        """Id of the bank update in force for a version (None: the bank it was trained with)."""
        version = version or self.current()
        return (self.store.read_text(f"banks/{version}/CURRENT") or "").strip() or None

    def bank_version(self, version: str | None = None) -> str:
        """The bank in force as served: an update's id, or ``TRAINED_BANK``."""
        return self.bank(version) or TRAINED_BANK

    def publish_bank(self, model: AbnormalMemory, version: str | None = None) -> str:
        """Save an update of a version (the model's abnormal bank, normal evidence and thresholds,
        as ``AbnormalMemory.save_memory`` writes them) and put it in force; returns the new label."""
        version = self.resolve(version)
        with tempfile.TemporaryDirectory(prefix="defectloop-bank-") as tmp:
            model.save_memory(Path(tmp))
            model.calibration.save(Path(tmp) / "calibration.json")
            bank_id = self._claim(f"banks/{version}/claims", "b")
            self.store.upload_dir(Path(tmp), f"banks/{version}/{bank_id}", last=("abnormal_bank.json",))
        self.store.write(f"banks/{version}/CURRENT", bank_id.encode())
        return self.label(version)

    # ----- image-level labels ---------------------------------------------------------------
    def publish_labels(self, labels: dict[str, list[dict]]) -> None:
        """Record the pool images annotators confirmed, by label ("normal", "defective": lists of
        {"source", "category", "image"}), each list whole."""
        for label, images in labels.items():
            self.store.write(f"labels/{label}.json", json.dumps(images, indent=1).encode())

    def labels(self, label: str) -> list[dict]:
        """The pool images last recorded with a label (none before the first record)."""
        return json.loads(self.store.read_text(f"labels/{label}.json", "[]"))

    def label(self, version: str | None = None) -> str:
        """What a served model calls itself: the version, plus the bank update in force."""
        version = self.resolve(version)
        bank = self.bank(version)
        return f"{version}-{bank}" if bank else version


def resolve_model_dir(location: str | os.PathLike) -> Path:
    """A local folder with a model version: from a version folder or a registry (its current
    version), local or on S3."""
    store = open_store(location)
    if store.exists("config.json"):
        return local_copy(store, "", "config.json")
    if Registry.is_registry(location):
        return Registry(location).path()
    raise FileNotFoundError(f"{location} is neither a model version directory nor a registry")

"""Model-version registry on the local filesystem.

    <root>/versions/<id>/   one model version directory each (see models.base)
    <root>/CURRENT          the id being served, replaced atomically (os.replace)
    <root>/history.json     previous CURRENT values, for rollback
    <root>/banks/<id>/bNNNN/  abnormal-bank updates of a version (labels confirmed since training)
    <root>/banks/<id>/CURRENT the bank in force for that version

A version is written under a temporary name and renamed into place, so a reader never sees a
half-written version; a failed save leaves the registry as it was. A version directory never
changes once written: annotators' new masks reach a served model as a new bank of that version,
and the served label (``v0003-b0002``) changes with it, so Label Studio re-predicts.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from defectloop.memory import AbnormalBank
from defectloop.models import AnomalyModel, load_model


@dataclass(frozen=True)
class VersionInfo:
    id: str
    kind: str
    created: float
    current: bool


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Registry:
    """Versions of one model line, with a current pointer and rollback."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.versions = self.root / "versions"
        self.versions.mkdir(parents=True, exist_ok=True)

    def ids(self) -> list[str]:
        return sorted(p.name for p in self.versions.iterdir() if p.is_dir() and not p.name.startswith("."))

    def path(self, version: str | None = None) -> Path:
        version = version or self.current()
        if version is None:
            raise LookupError(f"registry {self.root} has no current version")
        p = self.versions / version
        if not p.is_dir():
            raise LookupError(f"registry {self.root} has no version {version!r} (have: {', '.join(self.ids())})")
        return p

    def current(self) -> str | None:
        f = self.root / "CURRENT"
        return f.read_text().strip() or None if f.exists() else None

    def _history(self) -> list[str]:
        f = self.root / "history.json"
        return json.loads(f.read_text()) if f.exists() else []

    def set_current(self, version: str) -> None:
        self.path(version)  # must exist
        previous = self.current()
        if previous == version:
            return
        if previous:
            _atomic_write(self.root / "history.json", json.dumps([*self._history(), previous]))
        _atomic_write(self.root / "CURRENT", version)

    def rollback(self) -> str:
        """Make the previously current version current again."""
        history = self._history()
        if not history:
            raise LookupError("nothing to roll back to")
        version = history[-1]
        _atomic_write(self.root / "CURRENT", version)
        _atomic_write(self.root / "history.json", json.dumps(history[:-1]))
        return version

    def register(self, model: AnomalyModel, metrics: dict | None = None, make_current: bool = True) -> str:
        """Save a model as a new version (atomically) and, by default, make it current."""
        tmp = self.versions / f".incoming-{uuid.uuid4().hex}"
        try:
            model.save(tmp)
            meta = {"kind": model.kind, "created": time.time()}
            (tmp / "version.json").write_text(json.dumps(meta))
            if metrics is not None:
                (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
            n = len(self.ids()) + 1
            while True:  # concurrent writers: the first rename wins a number, the other takes the next
                version = f"v{n:04d}"
                try:
                    os.rename(tmp, self.versions / version)
                    break
                except OSError:
                    if not (self.versions / version).exists():
                        raise
                    n += 1
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if make_current:
            self.set_current(version)
        return version

    # ----- abnormal-bank updates ------------------------------------------------------------
    def bank(self, version: str | None = None) -> str | None:
        """Id of the bank update in force for a version (None: the bank it was trained with)."""
        version = version or self.current()
        f = self.root / "banks" / str(version) / "CURRENT"
        return (f.read_text().strip() or None) if f.exists() else None

    def publish_bank(self, bank: AbnormalBank, version: str | None = None) -> str:
        """Save an updated abnormal bank for a version (atomically) and put it in force; returns the new label."""
        version = self.path(version).name
        folder = self.root / "banks" / version
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".incoming-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            bank.save(tmp)
            n = len([p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]) + 1
            while True:
                bank_id = f"b{n:04d}"
                try:
                    os.rename(tmp, folder / bank_id)
                    break
                except OSError:
                    if not (folder / bank_id).exists():
                        raise
                    n += 1
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _atomic_write(folder / "CURRENT", bank_id)
        return self.label(version)

    def label(self, version: str | None = None) -> str:
        """What a served model calls itself: the version, plus the bank update in force."""
        version = self.path(version).name
        bank = self.bank(version)
        return f"{version}-{bank}" if bank else version

    def list(self) -> list[VersionInfo]:
        cur = self.current()
        out = []
        for v in self.ids():
            meta_file = self.versions / v / "version.json"
            meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
            out.append(VersionInfo(v, meta.get("kind", "?"), meta.get("created", 0.0), v == cur))
        return out

    def load(self, version: str | None = None) -> AnomalyModel:
        """A version's model with its bank update in force (if any)."""
        path = self.path(version)
        model = load_model(path)
        bank = self.bank(path.name)
        if bank:
            model.abnormal_bank = AbnormalBank.load(self.root / "banks" / path.name / bank)
        return model


def resolve_model_dir(location: str | Path) -> Path:
    """A model version directory, or a registry root (its current version)."""
    p = Path(location)
    if (p / "config.json").is_file():
        return p
    if (p / "versions").is_dir():
        return Registry(p).path()
    raise FileNotFoundError(f"{p} is neither a model version directory nor a registry")


def read_uri(uri: str, allowed_roots: list[str] | tuple[str, ...] = ()) -> bytes:
    """Bytes behind a storage URI: ``s3://bucket/key`` (boto3, standard AWS settings) or a local file.

    Local files are read only below ``allowed_roots``: a service must not hand out arbitrary files.
    """
    if uri.startswith("s3://"):
        import boto3

        bucket, _, key = uri[5:].partition("/")
        if not bucket or not key:
            raise ValueError(f"{uri}: expected s3://bucket/key")
        return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    path = Path(uri[7:] if uri.startswith("file://") else uri).resolve()
    if not any(path.is_relative_to(Path(r).resolve()) for r in allowed_roots):
        raise PermissionError(f"{uri}: outside the folders this service may read")
    return path.read_bytes()

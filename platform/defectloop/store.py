"""Where artefacts live: a local folder or S3 (boto3), behind one small interface, and the
registry of model versions built on it.

Registry layout (the same on both backends; keys are relative to the registry's root):

    versions/<id>/...              files of a model version (see models.base)
    versions/<id>/version.json     written LAST: a version without it does not exist for readers
    claims/<id>                    written first, only if absent: how concurrent writers agree on ids
    CURRENT, history.json          the id being served; previous CURRENT values, for rollback
    banks/<id>/bNNNN/...           abnormal-bank updates of a version (labels confirmed since training)
    banks/<id>/CURRENT             the bank in force for that version
    labels/normal.json             pool images annotators confirmed normal (read by the retraining)

Every object is written whole (local: temporary file + rename; S3: one PUT), so a reader never
sees half a file, and the commit markers and pointers are written after what they point to, so a
reader never sees half a version; a failed save leaves the registry as it was. A version never
changes once committed: annotators' new masks reach a served model as a new bank of that version,
and the served label (``v0003-b0002``) changes with it, so Label Studio re-predicts. Reading an S3
version downloads it once into a local cache (versions are immutable, so the cache stays valid).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from defectloop.memory import AbnormalBank
from defectloop.models import AnomalyModel, load_model

log = logging.getLogger(__name__)

#: where S3 versions are cached locally (``DEFECTLOOP_CACHE`` overrides)
CACHE_DIR = Path(os.environ.get("DEFECTLOOP_CACHE", Path.home() / ".cache" / "defectloop"))


class StoreError(RuntimeError):
    """The storage refused or could not be reached (after retries), with what to check."""


def is_s3(location: str | os.PathLike) -> bool:
    return str(location).startswith("s3://")


def join(*parts: str) -> str:
    """Join key parts, skipping empty ones (no leading or doubled '/')."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class Store(ABC):
    """Objects under a root: keys are '/'-separated paths relative to it."""

    uri: str

    @abstractmethod
    def read(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError when there is none."""

    @abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Write a whole object (readers see the old or the new one, never a mix)."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write only if the key does not exist yet; False when someone else was first."""

    @abstractmethod
    def keys(self, prefix: str) -> list[str]:
        """Every key below ``prefix/`` (recursive), sorted."""

    @abstractmethod
    def delete(self, prefix: str) -> None:
        """Remove a key, or everything below ``prefix/``."""

    @abstractmethod
    def upload_file(self, path: Path, key: str) -> None: ...

    @abstractmethod
    def download_file(self, key: str, path: Path) -> None: ...

    def exists(self, key: str) -> bool:
        try:
            self.read(key)
            return True
        except FileNotFoundError:
            return False

    def read_text(self, key: str, default: str | None = None) -> str | None:
        try:
            return self.read(key).decode()
        except FileNotFoundError:
            return default

    def stamp(self, key: str) -> str:
        """What changes whenever the object is written again (a cached copy is stale when it does)."""
        return hashlib.sha256(self.read(key)).hexdigest()

    def upload_dir(self, folder: Path, prefix: str, last: tuple[str, ...] = ()) -> None:
        """Upload a folder's files; the names in ``last`` go after all others (commit markers)."""
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name in last)
        for p in files:
            self.upload_file(p, join(prefix, p.relative_to(folder).as_posix()))

    def download_dir(self, prefix: str, folder: Path) -> None:
        for key in self.keys(prefix):
            self.download_file(key, folder / (key[len(prefix) + 1:] if prefix else key))


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def read(self, key: str) -> bytes:
        p = self._path(key)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")
        return p.read_bytes()

    def write(self, key: str, data: bytes) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, p)

    def create(self, key: str, data: bytes) -> bool:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        try:
            os.link(tmp, p)  # atomic, and fails if the name exists
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def keys(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*")
                      if p.is_file() and not p.name.startswith("."))

    def delete(self, prefix: str) -> None:
        p = self._path(prefix)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    def upload_file(self, path: Path, key: str) -> None:
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dst)

    def download_file(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(key), path)


@dataclass(frozen=True)
class S3Config:
    """Connection settings; unset fields fall back to boto3's standard chain (AWS_* variables,
    AWS_ENDPOINT_URL included, ~/.aws). ``DEFECTLOOP_S3_ENDPOINT`` overrides the endpoint."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    retries: int = 5  # boto3 "standard" mode: throttling, 5xx and connection errors, with backoff
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    multipart_mb: int = 16  # files above this go up in parallel parts

    @classmethod
    def from_env(cls) -> S3Config:
        env = os.environ
        return cls(endpoint_url=env.get("DEFECTLOOP_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL_S3")
                   or env.get("AWS_ENDPOINT_URL"), region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
                   retries=int(env.get("DEFECTLOOP_S3_RETRIES", "5")))


class S3Store(Store):
    """``s3://bucket/prefix`` on AWS S3 or any S3-compatible server (MinIO, seaweedfs)."""

    def __init__(self, uri: str, config: S3Config | None = None):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if not is_s3(uri):
            raise ValueError(f"not an s3:// URI: {uri}")
        self.bucket, _, prefix = uri[5:].partition("/")
        if not self.bucket:
            raise ValueError(f"{uri}: expected s3://bucket/prefix")
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.config = config or S3Config.from_env()
        c = self.config
        self.client = boto3.client(
            "s3", endpoint_url=c.endpoint_url, region_name=c.region or "us-east-1",
            aws_access_key_id=c.access_key, aws_secret_access_key=c.secret_key,
            config=Config(retries={"max_attempts": c.retries, "mode": "standard"}, connect_timeout=c.connect_timeout_s,
                          read_timeout=c.read_timeout_s, s3={"addressing_style": "path"}))
        self.transfer = TransferConfig(multipart_threshold=c.multipart_mb * 2**20, multipart_chunksize=c.multipart_mb * 2**20)

    def _key(self, key: str) -> str:
        return join(self.prefix, key)

    def _call(self, what: str, fn, *args, **kw):
        """Run a boto3 call; turn its failures into errors that say what to check."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kw)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise FileExistsError(f"{self.uri}: {what}: exists") from e
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"{self.uri}: {what}: not found") from e
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken",
                        "ExpiredToken"):
                raise StoreError(f"{self.uri}: {what}: S3 refused the credentials ({code}); check "
                                 "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy") from e
            if code == "NoSuchBucket":
                raise StoreError(f"{self.uri}: bucket {self.bucket!r} does not exist") from e
            raise StoreError(f"{self.uri}: {what}: {code or e}") from e
        except BotoCoreError as e:  # connection refused, timeouts: already retried by botocore
            raise StoreError(f"{self.uri}: {what}: S3 at {self.client.meta.endpoint_url} unreachable after "
                             f"{self.config.retries} tries ({type(e).__name__}: {e})") from e

    def read(self, key: str) -> bytes:
        r = self._call(f"read {key}", self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return r["Body"].read()

    def stamp(self, key: str) -> str:
        r = self._call(f"stat {key}", self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        return f"{r['ETag']}@{r['LastModified'].isoformat()}"

    def write(self, key: str, data: bytes) -> None:
        self._call(f"write {key}", self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def create(self, key: str, data: bytes) -> bool:
        try:  # conditional write: S3 and recent S3-compatible servers refuse it when the key exists
            self._call(f"create {key}", self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data,
                       IfNoneMatch="*")
        except FileExistsError:
            return False
        return self.read(key) == data  # servers that ignore the condition: the last writer owns the key

    def keys(self, prefix: str) -> list[str]:
        full = self._key(prefix) + "/" if self._key(prefix) else ""
        out = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
        for page in self._call(f"list {prefix}", list, pages):
            out += [o["Key"] for o in page.get("Contents", [])]
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(k[strip:] for k in out)

    def delete(self, prefix: str) -> None:
        keys = [self._key(k) for k in self.keys(prefix)] or [self._key(prefix)]
        for i in range(0, len(keys), 1000):
            self._call(f"delete {prefix}", self.client.delete_objects, Bucket=self.bucket,
                       Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})

    def upload_file(self, path: Path, key: str) -> None:
        self._call(f"upload {key}", self.client.upload_file, str(path), self.bucket, self._key(key),
                   Config=self.transfer)

    def download_file(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        self._call(f"download {key}", self.client.download_file, self.bucket, self._key(key), str(tmp),
                   Config=self.transfer)
        os.replace(tmp, path)


def open_store(location: str | os.PathLike, s3: S3Config | None = None) -> Store:
    """A store for ``s3://bucket/prefix`` or a local folder."""
    return S3Store(str(location), s3) if is_s3(location) else LocalStore(location)


STAMP = ".defectloop-stamp"  # in a cached copy: the stamp of its marker when it was downloaded


def cache_path(store: Store, prefix: str) -> Path:
    return CACHE_DIR / hashlib.sha256(store.uri.encode()).hexdigest()[:16] / prefix


def local_copy(store: Store, prefix: str, marker: str) -> Path:
    """A local folder holding ``prefix`` of the store: the folder itself when local, else a cached
    download (complete or absent: it is downloaded beside and renamed into place)."""
    if isinstance(store, LocalStore):
        return store._path(prefix)
    dst = cache_path(store, prefix)
    # the same URI may hold other bytes than when cached (a recreated bucket, a rewritten folder): the
    # marker, written last, is stamped on download and checked on every use
    stamp = store.stamp(join(prefix, marker))
    if (dst / marker).is_file() and (dst / STAMP).is_file() and (dst / STAMP).read_text() == stamp:
        return dst
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}")
    try:
        store.download_dir(prefix, tmp)
        if not (tmp / marker).is_file():
            raise FileNotFoundError(f"{store.uri}/{prefix}: incomplete (no {marker})")
        (tmp / STAMP).write_text(stamp)
        shutil.rmtree(dst, ignore_errors=True)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


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
        if bank:
            model.abnormal_bank = AbnormalBank.load(
                local_copy(self.store, f"banks/{path.name}/{bank}", "abnormal_bank.json"))
        return model

    # ----- abnormal-bank updates ------------------------------------------------------------
    def bank(self, version: str | None = None) -> str | None:
        """Id of the bank update in force for a version (None: the bank it was trained with)."""
        version = version or self.current()
        return (self.store.read_text(f"banks/{version}/CURRENT") or "").strip() or None

    def publish_bank(self, bank: AbnormalBank, version: str | None = None) -> str:
        """Save an updated abnormal bank for a version and put it in force; returns the new label."""
        version = self.resolve(version)
        with tempfile.TemporaryDirectory(prefix="defectloop-bank-") as tmp:
            bank.save(Path(tmp))
            bank_id = self._claim(f"banks/{version}/claims", "b")
            self.store.upload_dir(Path(tmp), f"banks/{version}/{bank_id}", last=("abnormal_bank.json",))
        self.store.write(f"banks/{version}/CURRENT", bank_id.encode())
        return self.label(version)

    # ----- image-level labels ---------------------------------------------------------------
    def publish_normals(self, images: list[dict]) -> None:
        """Record the pool images annotators confirmed normal ({"source", "category"}), whole."""
        self.store.write("labels/normal.json", json.dumps(images, indent=1).encode())

    def normals(self) -> list[dict]:
        """The pool images last recorded as confirmed normal (none before the first record)."""
        return json.loads(self.store.read_text("labels/normal.json", "[]"))

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


def list_images(location: str | os.PathLike) -> list[str]:
    """Image files below a local folder or ``s3://bucket/prefix`` (an image pool), as paths or URIs."""
    from defectloop.data.images import IMAGE_SUFFIXES

    store = open_store(location)
    base = store.uri.rstrip("/")
    return [f"{base}/{k}" for k in store.keys("") if k.lower().endswith(IMAGE_SUFFIXES)]


def arrow_filesystem(location: str | os.PathLike, s3: S3Config | None = None):
    """(path, pyarrow filesystem) for Ray Train's ``storage_path``/``storage_filesystem``, so that
    checkpoints land beside the registry; S3 gets the same endpoint and credentials as boto3."""
    if not is_s3(location):
        return str(Path(location).resolve()), None
    import boto3
    from pyarrow import fs

    c = s3 or S3Config.from_env()
    creds = boto3.Session(aws_access_key_id=c.access_key, aws_secret_access_key=c.secret_key).get_credentials()
    endpoint = c.endpoint_url or ""
    filesystem = fs.S3FileSystem(
        access_key=creds.access_key if creds else None, secret_key=creds.secret_key if creds else None,
        session_token=creds.token if creds else None, region=c.region or "us-east-1",
        endpoint_override=endpoint.split("://", 1)[-1] or None,
        scheme="http" if endpoint.startswith("http://") else "https", force_virtual_addressing=False)
    return str(location)[5:].rstrip("/"), filesystem


def read_uri(uri: str, allowed_roots: list[str] | tuple[str, ...] = ()) -> bytes:
    """Bytes behind a storage URI: ``s3://bucket/key`` or a local file.

    Local files are read only below ``allowed_roots``: a service must not hand out arbitrary files.
    """
    if is_s3(uri):
        bucket, _, key = uri[5:].partition("/")
        if not bucket or not key:
            raise ValueError(f"{uri}: expected s3://bucket/key")
        return S3Store(f"s3://{bucket}").read(key)
    path = Path(uri[7:] if uri.startswith("file://") else uri).resolve()
    if not any(path.is_relative_to(Path(r).resolve()) for r in allowed_roots):
        raise PermissionError(f"{uri}: outside the folders this service may read")
    return path.read_bytes()

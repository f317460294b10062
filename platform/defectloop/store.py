"""Where bytes live: a local folder or S3 (boto3), behind one small interface.

Every object is written whole (local: temporary file + rename; S3: one PUT), so a reader never
sees half a file. Nothing here knows what the bytes are: model versions are the business of
:mod:`defectloop.registry`, built on this.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

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

    def _staged(self, key: str) -> tuple[Path, Path]:
        """(final path, a hidden temporary name beside it): written there first, then renamed."""
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p, p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")

    def write(self, key: str, data: bytes) -> None:
        p, tmp = self._staged(key)
        tmp.write_bytes(data)
        os.replace(tmp, p)

    def create(self, key: str, data: bytes) -> bool:
        p, tmp = self._staged(key)
        tmp.write_bytes(data)
        try:
            os.link(tmp, p)  # atomic, and fails if the name exists
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

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
        dst, tmp = self._staged(key)
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

    def exists(self, key: str) -> bool:
        try:
            self._call(f"stat {key}", self.client.head_object, Bucket=self.bucket, Key=self._key(key))
            return True
        except FileNotFoundError:
            return False

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


def read_uri(uri: str, allowed_roots: list[str] | tuple[str, ...] = (), max_bytes: int | None = None) -> bytes:
    """Bytes behind a storage URI: ``s3://bucket/key`` or a local file.

    Local files are read only below ``allowed_roots`` (a service must not hand out arbitrary files),
    only when they are regular files (a FIFO or a device would block the reading thread, and six
    such requests exhausted the pool that every request's reads share) and of at most ``max_bytes``.
    """
    if is_s3(uri):
        bucket, _, key = uri[5:].partition("/")
        if not bucket or not key:
            raise ValueError(f"{uri}: expected s3://bucket/key")
        return S3Store(f"s3://{bucket}").read(key)
    path = Path(uri[7:] if uri.startswith("file://") else uri).resolve()
    if not any(path.is_relative_to(Path(r).resolve()) for r in allowed_roots):
        raise PermissionError(f"{uri}: outside the folders this service may read")
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{uri}: not a regular file")
    if max_bytes is not None and info.st_size > max_bytes:
        raise FileTooLarge(f"{uri}: {info.st_size} bytes, over the {max_bytes} byte limit")
    with path.open("rb") as fh:  # it may grow meanwhile: never more than the limit
        data = fh.read(max_bytes + 1 if max_bytes is not None else -1)
    if max_bytes is not None and len(data) > max_bytes:
        raise FileTooLarge(f"{uri}: over the {max_bytes} byte limit")
    return data


class FileTooLarge(ValueError):
    """A file over the request's byte limit (413)."""

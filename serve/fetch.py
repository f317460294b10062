"""Reading the images a scoring request names by URI (the JSON form of ``/v1/score``)."""

from __future__ import annotations

import stat
from pathlib import Path

from defectloop.store import S3Store, is_s3


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

"""Reading the images a scoring request names by URI (the JSON form of ``/v1/score``)."""

from __future__ import annotations

from pathlib import Path

from defectloop.store import S3Store, is_s3


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

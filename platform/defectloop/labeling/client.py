"""Talking to a Label Studio server: authentication, and fetching task media with retries.

Label Studio accepts two kinds of token: a legacy token (``Authorization: Token ...``) and a
personal access token, a JWT refresh token exchanged at ``/api/token/refresh`` for a short-lived
access token (``Authorization: Bearer ...``). Either works here.
"""

from __future__ import annotations

import base64
import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urljoin, urlparse

import httpx

log = logging.getLogger(__name__)
T = TypeVar("T")


#: what one fetched image may cost, whatever its server does: bytes, and seconds in all (a slow or
#: endless body holds a request, and a thread, no longer than this)
MAX_FETCH_MB = 64.0
FETCH_DEADLINE_S = 30.0
MAX_REDIRECTS = 3


class StudioError(RuntimeError):
    """Label Studio could not be reached or refused, after retries."""


class FetchRefused(StudioError):
    """A fetch this service will not make or finish: a host it may not reach, a redirect to one,
    an image over the byte or time cap."""


class _Retry(Exception):
    """A server error worth another try."""


def configured_fetch_hosts() -> list[str]:
    """Hosts besides Label Studio's that images may be fetched from: ``DEFECTLOOP_FETCH_HOSTS``
    (comma-separated, ``host:port`` or URLs) and the configured S3 endpoint (where Label Studio's
    presigned URLs point)."""
    from defectloop.store import S3Config

    hosts = [h.strip() for h in os.environ.get("DEFECTLOOP_FETCH_HOSTS", "").split(",") if h.strip()]
    endpoint = S3Config.from_env().endpoint_url
    return hosts + ([endpoint] if endpoint else [])


def _origin(url: str) -> tuple[str, int]:
    """(host, port) of a URL or a ``host:port``, the port filled in from the scheme."""
    parsed = urlparse(url if "//" in url else f"//{url}")
    default = 443 if parsed.scheme == "https" else 80
    return (parsed.hostname or "").lower(), parsed.port or default


def _shown(url: str) -> str:
    """A URL fit for an error message: no query (presigned URLs carry credentials there)."""
    parsed = urlparse(url)
    return f"{parsed.scheme}://{parsed.netloc}{parsed.path}"


class StudioClient:
    """Label Studio's API, and the images of its tasks.

    Images are fetched only from Label Studio's own host and the hosts ``fetch_hosts`` names (by
    default ``configured_fetch_hosts()``): a task's image URL comes from whoever wrote the task (or
    the body of a ``/ls/predict`` request), and a service that fetches any URL it is handed can be
    aimed at internal ones. Redirects are followed only to allowed hosts, a fetch stops at
    ``max_fetch_mb`` and ``fetch_deadline_s``, and an upstream error's body is never passed on.
    """

    def __init__(self, url: str, token: str, retries: int = 3, backoff_s: float = 0.5, timeout_s: float = 30.0,
                 fetch_hosts: list[str] | None = None, max_fetch_mb: float = MAX_FETCH_MB,
                 fetch_deadline_s: float = FETCH_DEADLINE_S):
        if not url:
            raise ValueError("Label Studio URL is not set (LABEL_STUDIO_URL)")
        if not token:
            raise ValueError("Label Studio token is not set (LABEL_STUDIO_API_KEY)")
        self.url = url.rstrip("/") + "/"
        self.token = token
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.allowed = {_origin(self.url), *(_origin(h) for h in (configured_fetch_hosts() if fetch_hosts is None else fetch_hosts))}
        self.max_fetch_bytes = int(max_fetch_mb * 2**20)
        self.fetch_deadline_s = fetch_deadline_s
        self.http = httpx.Client(timeout=timeout_s, follow_redirects=False)
        self._access: tuple[str, float] | None = None

    def _is_jwt(self) -> bool:
        return self.token.count(".") == 2

    def headers(self) -> dict[str, str]:
        if not self._is_jwt():
            return {"Authorization": f"Token {self.token}"}
        if self._access is None or self._access[1] < time.time():
            r = self.request("POST", "api/token/refresh", json={"refresh": self.token}, auth=False)
            self._access = (r.json()["access"], time.time() + 240)
        return {"Authorization": f"Bearer {self._access[0]}"}

    def request(self, method: str, path: str, auth: bool = True, **kw) -> httpx.Response:
        """One call of Label Studio's API, retried with backoff on connection errors and 5xx; 4xx raise at once."""
        url = urljoin(self.url, path.lstrip("/"))
        if _origin(url) != _origin(self.url):
            raise FetchRefused(f"{_shown(url)} is not Label Studio's API at {self.url}")
        extra = kw.pop("headers", {})

        def once() -> httpx.Response:
            r = self.http.request(method, url, headers={**(self.headers() if auth else {}), **extra}, **kw)
            if r.status_code >= 500:
                raise _Retry(f"HTTP {r.status_code}: {r.text[:200]}")
            if r.status_code >= 400:
                raise StudioError(f"Label Studio {method} {_shown(url)}: HTTP {r.status_code}: {r.text[:300]}")
            return r

        return self._retried(once, f"Label Studio at {self.url}")

    def _retried(self, once: Callable[[], T], what: str, deadline: float | None = None) -> T:
        """``once()``, tried again with backoff on connection errors and server errors (``_Retry``),
        up to ``retries`` more times and, if given, not past ``deadline``; other errors raise at once."""
        for attempt in range(self.retries + 1):
            try:
                return once()
            except (httpx.HTTPError, _Retry) as e:
                last = f"{type(e).__name__}: {e}" if isinstance(e, httpx.HTTPError) else str(e)
            wait = self.backoff_s * 2**attempt
            if attempt == self.retries or (deadline is not None and time.monotonic() + wait >= deadline):
                break
            time.sleep(wait)
        raise StudioError(f"{what} unreachable after {attempt + 1} tries: {last}")

    def fetch(self, uri: str, task_id: int | None = None) -> bytes:
        """Bytes of a task's media: a Label Studio path (/data/..., /tasks/N/resolve/?fileuri=...), a
        URL on an allowed host, or a cloud URI (s3://...) that Label Studio resolves for the task."""
        if uri.startswith(("s3://", "gs://", "azure-blob://")):
            if task_id is None:
                raise ValueError(f"{uri}: a cloud URI needs the task id to be resolved through Label Studio")
            fileuri = base64.urlsafe_b64encode(uri.encode()).decode()  # Label Studio redirects to a presigned URL
            uri = f"tasks/{task_id}/resolve/?fileuri={fileuri}"
        parsed = urlparse(uri)
        if parsed.scheme not in ("", "http", "https"):
            raise FetchRefused(f"{uri[:100]}: only http(s) URLs and Label Studio paths are fetched")
        return self._download(urljoin(self.url, uri.lstrip("/")) if not parsed.scheme else uri)

    def _download(self, url: str) -> bytes:
        """GET ``url`` within the caps, following redirects to allowed hosts only; retried like ``request``."""
        deadline = time.monotonic() + self.fetch_deadline_s
        return self._retried(lambda: self._get(url, deadline), _shown(url), deadline)

    def _get(self, url: str, deadline: float) -> bytes:
        """One try of ``_download``: the redirect hops (httpx's own following cannot check each hop's host)."""
        for _ in range(MAX_REDIRECTS + 1):
            if _origin(url) not in self.allowed:
                raise FetchRefused(f"{_shown(url)}: not a host this service fetches from (Label Studio at "
                                   f"{self.url}, or DEFECTLOOP_FETCH_HOSTS)")
            headers = self.headers() if _origin(url) == _origin(self.url) else {}  # the token goes to Label Studio only
            left = deadline - time.monotonic()
            if left <= 0:
                raise FetchRefused(f"{_shown(url)}: no answer within {self.fetch_deadline_s:g} s")
            with self.http.stream("GET", url, headers=headers, timeout=min(self.timeout_s, left)) as r:
                if r.is_redirect:
                    url = urljoin(url, r.headers.get("location", ""))
                    continue
                if r.status_code >= 500:
                    raise _Retry(f"HTTP {r.status_code}")
                if r.status_code >= 400:  # the body stays upstream: it may say what no client should see
                    raise StudioError(f"GET {_shown(url)}: HTTP {r.status_code}")
                length = r.headers.get("content-length", "")
                if length.isdigit() and int(length) > self.max_fetch_bytes:
                    raise FetchRefused(f"{_shown(url)}: {int(length)} bytes, over the {self.max_fetch_bytes} byte cap")
                body = bytearray()
                for chunk in r.iter_bytes():
                    body += chunk
                    if len(body) > self.max_fetch_bytes:
                        raise FetchRefused(f"{_shown(url)}: over the {self.max_fetch_bytes} byte cap")
                    if time.monotonic() > deadline:
                        raise FetchRefused(f"{_shown(url)}: not complete within {self.fetch_deadline_s:g} s")
                return bytes(body)
        raise FetchRefused(f"{_shown(url)}: more than {MAX_REDIRECTS} redirects")

    def close(self) -> None:
        self.http.close()


"""Talking to a Label Studio server: authentication, and fetching task media with retries.

Label Studio accepts two kinds of token: a legacy token (``Authorization: Token ...``) and a
personal access token, a JWT refresh token exchanged at ``/api/token/refresh`` for a short-lived
access token (``Authorization: Bearer ...``). Either works here.
"""

from __future__ import annotations

import base64
import logging
import time
from urllib.parse import urljoin, urlparse

import httpx

log = logging.getLogger(__name__)


class StudioError(RuntimeError):
    """Label Studio could not be reached or refused, after retries."""


class StudioClient:
    def __init__(self, url: str, token: str, retries: int = 3, backoff_s: float = 0.5, timeout_s: float = 30.0):
        if not url:
            raise ValueError("Label Studio URL is not set (LABEL_STUDIO_URL)")
        if not token:
            raise ValueError("Label Studio token is not set (LABEL_STUDIO_API_KEY)")
        self.url = url.rstrip("/") + "/"
        self.token = token
        self.retries = retries
        self.backoff_s = backoff_s
        self.http = httpx.Client(timeout=timeout_s, follow_redirects=True)
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
        """One API call, retried with backoff on connection errors and 5xx; 4xx raise at once."""
        url = path if urlparse(path).scheme else urljoin(self.url, path.lstrip("/"))
        last = ""
        for attempt in range(self.retries + 1):
            try:
                headers = {**(self.headers() if auth else {}), **kw.pop("headers", {})}
                r = self.http.request(method, url, headers=headers, **kw)
                if r.status_code < 500:
                    if r.status_code >= 400:
                        raise StudioError(f"Label Studio {method} {url}: HTTP {r.status_code}: {r.text[:300]}")
                    return r
                last = f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt)
        raise StudioError(f"Label Studio at {self.url} unreachable after {self.retries + 1} tries: {last}")

    def fetch(self, uri: str, task_id: int | None = None) -> bytes:
        """Bytes of a task's media: a Label Studio path (/data/..., /tasks/N/resolve/?fileuri=...), an
        outside URL, or a cloud URI (s3://...) that Label Studio resolves for the task."""
        if uri.startswith(("s3://", "gs://", "azure-blob://")):
            if task_id is None:
                raise ValueError(f"{uri}: a cloud URI needs the task id to be resolved through Label Studio")
            fileuri = base64.urlsafe_b64encode(uri.encode()).decode()  # Label Studio redirects to a presigned URL
            return self.request("GET", f"tasks/{task_id}/resolve/?fileuri={fileuri}").content
        parsed = urlparse(uri)
        if parsed.scheme in ("http", "https") and not uri.startswith(self.url):
            return self.request("GET", uri, auth=False).content  # someone else's server: no token
        return self.request("GET", uri).content

    def close(self) -> None:
        self.http.close()

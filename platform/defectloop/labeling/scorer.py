"""The loop's view of the scorer service: is it serving what the loop just published?

After a bank update or a retraining the loop publishes a new label to the registry; the Ray Serve
scorer hot-loads it and answers Label Studio's ``/predict`` with it. The loop then waits until the
scorer reports that label (``GET /v1/model``), retrying with backoff while the scorer is down or
still loading, and reports what it saw. Nothing is lost while the scorer is down: the bank is
already in the registry and the pool's predictions are pushed by the loop itself, so the scorer
simply loads the newest label when it is back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import httpx

from defectloop.registry import TRAINED_BANK

log = logging.getLogger(__name__)


class ScorerUnavailable(RuntimeError):
    """The scorer could not be reached, or answered with an error."""


@dataclass(frozen=True)
class ScorerStatus:
    ok: bool  # the scorer serves the label the loop expects
    expected: str
    served: str | None  # what it reported last (None: never reached)
    waited_s: float
    detail: str = ""

    def __str__(self) -> str:
        if self.ok:
            return f"scorer serves {self.served}"
        return (f"scorer not serving {self.expected} after {self.waited_s:.0f} s ({self.detail}); it loads the newest "
                f"label from the registry when it is back, nothing is lost")


class ScorerClient:
    def __init__(self, url: str, token: str | None = None, timeout_s: float = 10.0):
        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=timeout_s, headers={"Authorization": f"Bearer {token}"} if token else {})

    def served_label(self) -> str:
        """The label the scorer serves now: its version, plus ``-bNNNN`` with a bank update in force."""
        try:
            r = self.http.get(f"{self.url}/v1/model")
        except httpx.HTTPError as e:
            raise ScorerUnavailable(f"{self.url} unreachable: {type(e).__name__}: {e}") from e
        if r.status_code != 200:
            raise ScorerUnavailable(f"{self.url}/v1/model: HTTP {r.status_code}: {r.text[:200]}")
        body = r.json()
        version, bank = body["model_version"], body.get("bank_version", TRAINED_BANK)
        return version if bank == TRAINED_BANK else f"{version}-{bank}"

    def wait_for(self, label: str, timeout_s: float = 120.0, poll_s: float = 0.5) -> ScorerStatus:
        """Poll until the scorer serves ``label``: backoff up to 5 s between tries, then report."""
        t0 = time.monotonic()
        served, detail, delay = None, "", poll_s
        while True:
            try:
                served = self.served_label()
                if served == label:
                    return ScorerStatus(True, label, served, time.monotonic() - t0)
                detail = f"it serves {served}"
            except ScorerUnavailable as e:
                detail = str(e)
            waited = time.monotonic() - t0
            if waited >= timeout_s:
                status = ScorerStatus(False, label, served, waited, detail)
                log.warning("%s", status)
                return status
            time.sleep(min(delay, max(0.0, timeout_s - waited)))
            delay = min(5.0, delay * 2)

"""The service's edge: what stands between an HTTP client and a scorer replica.

Ray Serve's proxy hands an HTTP request to one replica and answers 500 when that replica dies under
it (SIGKILL, out-of-memory kill, lost node): Serve does not send an HTTP request again. So the
ingress is a light gateway (``serve.app.Gateway``) that holds the client's request itself: its
``TokenGate`` and ``BodyLimit`` answer a request that is not allowed before reading its body, the
body is read once, and the request (its ASGI scope, ``forwardable``, and body) is passed to a
scorer replica, which runs the scoring app on it (``call_asgi``) and returns the ``Answer``. When the replica dies mid-request, the
gateway sends it again to another one. Every route may be sent twice: scoring is a pure function
of the request and the served version, and the inbox stores a webhook event once.

Nothing here imports Ray: the gateway app runs in-process in tests with a ``forward`` that calls the
scoring app directly.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from fastapi import FastAPI, HTTPException, Request
from starlette.responses import JSONResponse, Response

from defectloop.serve.context import OPEN_PATHS, UNAUTHORIZED, token_ok
from defectloop.serve.settings import ServeSettings

log = logging.getLogger(__name__)

GetSettings = Callable[[], ServeSettings]

#: the parts of an HTTP scope that a scorer replica needs, all picklable (Starlette adds its app,
#: router and route objects to the scope as it routes, which must not travel)
SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string", "headers",
              "client", "server")


class Answer(NamedTuple):
    """An HTTP response as the scorer replica made it."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


Forward = Callable[[dict, bytes], Awaitable[Answer]]  # (scope, body) -> the scorer's answer


def forwardable(scope: dict) -> dict:
    """The request's scope as it is sent to a scorer replica."""
    return {**{k: scope[k] for k in SCOPE_KEYS if k in scope}, "root_path": ""}


async def call_asgi(app, scope: dict, body: bytes) -> Answer:
    """Run an ASGI app on a request whose body is already read, and collect its response.

    Hand-written because httpx's ``ASGITransport`` builds the scope anew from a URL: the client's
    address (which ``TokenGate`` counts by) and the raw headers would not reach the app as sent.
    """
    status, headers, chunks = 500, [], []
    sent, done = False, asyncio.Event()

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()  # the client stays connected until the response is complete
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers") or [])
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    try:
        await app(scope, receive, send)
    except Exception:
        if not done.is_set():  # the app failed before it answered
            raise
        log.exception("%s %s failed after its answer was sent", scope.get("method"), scope.get("path"))
    return Answer(status, headers, b"".join(chunks))


class TokenGate:
    """ASGI middleware, before a byte of a request's body is read: 503 on every route while the
    service drains; on every route but ``OPEN_PATHS``, 401 without the token (FastAPI reads a body
    before it runs the route's dependencies, so an unauthenticated client could otherwise make the
    service take in a body) and 429 to a client with ``max_requests_per_client`` requests in flight on this gateway
    replica already (one client, however authenticated, must not take all of the service's
    request slots from the others)."""

    def __init__(self, app, get_settings: GetSettings):
        self.app = app
        self.get_settings = get_settings
        self.in_flight: Counter[str] = Counter()  # per client address; changed in the event loop's thread only

    @property
    def taken(self) -> int:
        """Requests past the gates that have yet to be answered (what a drain lets finish)."""
        return sum(self.in_flight.values())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self.get_settings()
        if settings.draining:  # health included: a readiness probe sees it
            response = JSONResponse({"status": "draining", "ready": False,
                                     "detail": "this scorer is shutting down: retry shortly (another replica, "
                                               "or the service once restarted)"}, 503, headers={"Retry-After": "5"})
            return await response(scope, receive, send)
        if scope.get("path", "") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        authorization = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        client = (scope.get("client") or ("unknown",))[0]
        if not token_ok(authorization, settings):
            response = JSONResponse({"detail": UNAUTHORIZED}, 401, headers={"WWW-Authenticate": "Bearer"})
        elif self.in_flight[client] >= settings.max_requests_per_client:
            response = JSONResponse({"detail": f"{settings.max_requests_per_client} requests of this client are in "
                                               "flight already: retry when one has finished"}, 429,
                                    headers={"Retry-After": "1"})
        else:
            self.in_flight[client] += 1
            try:
                return await self.app(scope, receive, send)
            finally:
                self.in_flight[client] -= 1
                if not self.in_flight[client]:
                    del self.in_flight[client]
        return await response(scope, receive, send)


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_request_mb`` (413), counted as they arrive,
    and bodies not complete within ``body_timeout_s`` of the request (408): a client that announces
    a body and stalls holds a request slot only that long."""

    def __init__(self, app, get_settings: GetSettings):
        self.app = app
        self.get_settings = get_settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self.get_settings()
        limit, timeout = settings.max_request_bytes, settings.body_timeout_s
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await JSONResponse({"detail": f"request body over the {limit} byte limit"}, 413)(scope, receive, send)
        seen, complete = 0, False
        deadline = asyncio.get_running_loop().time() + timeout

        async def limited():
            nonlocal seen, complete
            if complete:  # after the body: a wait for the client's disconnect, with no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except TimeoutError:
                raise HTTPException(408, f"request body not complete within {timeout:g} s") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > limit:
                    raise HTTPException(413, f"request body over the {limit} byte limit")
            return message

        return await self.app(scope, limited, send)


def gateway_app(forward: Forward, get_settings: GetSettings) -> TokenGate:
    """The edge as an ASGI app: the gates, then the body (read under ``BodyLimit``), then ``forward``.

    Every path goes through, ``/docs`` and ``/openapi.json`` included: the scoring app documents the
    API, the gateway has none of its own.
    """
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.api_route("/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                   include_in_schema=False)
    async def relay(request: Request) -> Response:
        answer = await forward(forwardable(request.scope), await request.body())
        response = Response(answer.body, answer.status)
        response.raw_headers = answer.headers  # the scorer's own, content-length included
        return response

    return TokenGate(BodyLimit(app, get_settings), get_settings)


def local_gateway(app, get_settings: GetSettings):
    """The edge in front of a scoring app in this process (tests, tools): no Ray, no failover."""
    return gateway_app(lambda scope, body: call_asgi(app, scope, body), get_settings)

"""What every route of the scoring service shares: the model handle, auth, decoding, scoring.

The routes (``serve.api`` for ``/v1``, ``serve.ml_backend`` for Label Studio's ``/ls``) run inside
the Ray Serve deployment, where ``score_one`` is a ``@serve.batch`` method, and in-process for tests.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, NamedTuple, TypeVar

import numpy as np
import torch
from fastapi import HTTPException, Request, Security
from fastapi.security import HTTPBasic, HTTPBearer

from defectloop.data import ImageError, ImageTooLarge, read_image
from defectloop.data.tiles import Grid
from defectloop.features import tile_tensors
from defectloop.labeling.brush import BrushRLE, MaskCodec
from defectloop.labeling.inbox import EventInbox
from defectloop.scoring import ModelHandle, Scored
from defectloop.serve.schemas import ImageScore, Mask, ScoreResponse
from defectloop.serve.settings import ServeSettings


class IOPool:
    """Threads of their own for reading request images (local files, S3, Label Studio), bounded.

    Scoring runs in the event loop's default threads; reads that hang (a slow image host, storage
    timing out) would take every one of those and stop scoring. Here they queue for ``workers``
    threads instead, and ``saturated`` (every thread busy) is what /v1/health reports as not ready.
    """

    def __init__(self, workers: int = 8):
        self.workers = workers
        self.busy = 0  # changed in the event loop's thread only
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="defectloop-io")

    async def run(self, fn: Callable[..., T], *args) -> T:
        self.busy += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.busy -= 1

    @property
    def saturated(self) -> bool:
        return self.busy >= self.workers


@dataclass
class ScoringContext:
    """What the routes need: the model handle, a (batched) scorer for one image, settings, the inbox."""

    handle: ModelHandle
    score_one: Callable[[tuple[torch.Tensor, str | None, Grid]], Awaitable[Scored]]  # (image's tiles, category, their grid)
    settings: ServeSettings
    inbox: EventInbox
    codec: MaskCodec = BrushRLE()
    loop_status: Callable[[], Awaitable[dict]] | None = None  # the live loop's, when one runs
    io: IOPool = field(default_factory=IOPool)


T = TypeVar("T")

#: routes anyone may call: liveness, and the API's documentation
OPEN_PATHS = frozenset({"/v1/health", "/ls/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})

BEARER = HTTPBearer(auto_error=False, description="the service's API token")
BASIC = HTTPBasic(auto_error=False, description="any user, the API token as password (how Label Studio connects)")


def token_ok(authorization: str, settings: ServeSettings) -> bool:
    """Bearer token, or HTTP basic auth with the token as password, compared in constant time."""
    if not settings.auth:
        return True
    scheme, _, value = authorization.partition(" ")
    token = ""
    if scheme.lower() == "bearer":
        token = value.strip()
    elif scheme.lower() == "basic":
        try:
            token = base64.b64decode(value.strip()).decode().partition(":")[2]
        except ValueError:
            token = ""
    return bool(token) and hmac.compare_digest(token.encode(), (settings.api_token or "").encode())


def require_token(request: Request, _bearer: Annotated[object, Security(BEARER)] = None,
                  _basic: Annotated[object, Security(BASIC)] = None) -> None:
    """The route's auth (the gateway's ``TokenGate`` checked it before the body was read; this
    documents it in OpenAPI and guards the scoring app wherever it is called)."""
    if not token_ok(request.headers.get("authorization", ""), request.app.state.ctx.settings):
        raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})


UNAUTHORIZED = "missing or wrong API token (Authorization: Bearer <token>)"


class Decoded(NamedTuple):
    """An image of a request, read for the served model: reduced where it is far larger than the
    model needs (``read_image``), with its original size, which masks and heatmaps are given at."""

    name: str
    category: str | None
    image: np.ndarray
    size: tuple[int, int]  # (width, height) of the image as sent


def decode(name: str, category: str | None, data: bytes, ctx: ScoringContext) -> Decoded:
    """Bytes -> a Decoded image, or the 4xx that says why not (413 over the pixel limit)."""
    try:  # read at the size the category's tiles need (the model's input size for one tile)
        size_needed = ctx.handle.served.model.config.read_size(category)
        image, size = read_image(data, size_needed, max_pixels=int(ctx.settings.max_megapixels * 1e6))
    except ImageTooLarge as e:
        raise HTTPException(413, f"{name}: {e.reason}") from e
    except ImageError as e:
        raise HTTPException(400, f"{name}: {e.reason}") from e
    return Decoded(name, category, image, size)


async def score_arrays(ctx: ScoringContext, items: list[Decoded], heatmap: bool, mask: bool) -> ScoreResponse:
    """Score decoded images (batched with other requests) and build the per-image answers."""
    config = ctx.handle.served.model.config
    tensors = await asyncio.to_thread(lambda: [tile_tensors(d.image, config.tiling(d.category), config.image_size)
                                               for d in items])
    # each image scored as the grid it was cut into, even where a new version sees its category otherwise
    scored = await asyncio.gather(*(ctx.score_one((t, d.category, config.grid(d.category)))
                                    for t, d in zip(tensors, items, strict=True)))

    def build() -> list[ImageScore]:
        out = []
        for (name, category, _, (w, h)), s in zip(items, scored, strict=True):
            p = s.prediction
            res = ImageScore(name=name, category=category, score=p.score, normalised_score=p.normalised_score,
                             threshold=p.threshold, threshold_of="category" if p.known_category else "all categories",
                             decision=p.decision, model_version=s.served.version,
                             bank_version=s.served.bank, width=w, height=h)
            if heatmap:
                res.heatmap_png = b64(p.heatmap_png(w, h))
            if mask:
                m = p.mask(w, h)
                res.mask = Mask(rle=ctx.codec.encode(m), width=w, height=h, pixels=int(m.sum()))
            out.append(res)
        return out

    results = await asyncio.to_thread(build)
    return ScoreResponse(model_version=results[0].model_version, bank_version=results[0].bank_version,
                         results=results)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")

"""What every route of the scoring service shares: the model handle, auth, decoding, scoring.

The routes (``serve.api`` for ``/v1``, ``serve.ml_backend`` for Label Studio's ``/ls``) run inside
the Ray Serve deployment, where ``score_one`` is a ``@serve.batch`` method, and in-process for tests.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import torch
from fastapi import HTTPException, Request

from defectloop.data import ImageError, ImageTooLarge, load_image
from defectloop.features import image_tensor
from defectloop.labeling.brush import BrushRLE, MaskCodec
from defectloop.labeling.inbox import EventInbox
from defectloop.scoring import ModelHandle, Scored
from defectloop.serve.schemas import ImageScore, Mask, ScoreResponse
from defectloop.serve.settings import ServeSettings


@dataclass
class ScoringContext:
    """What the routes need: the model handle, a (batched) scorer for one image, settings, the inbox."""

    handle: ModelHandle
    score_one: Callable[[tuple[torch.Tensor, str | None]], Awaitable[Scored]]  # (image, category)
    settings: ServeSettings
    inbox: EventInbox
    codec: MaskCodec = BrushRLE()
    loop_status: Callable[[], Awaitable[dict]] | None = None  # the live loop's, when one runs


def require_token(request: Request) -> None:
    """Bearer token, or HTTP basic auth with the token as password (how Label Studio authenticates)."""
    settings: ServeSettings = request.app.state.ctx.settings
    if not settings.auth:
        return
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    token = ""
    if scheme.lower() == "bearer":
        token = value.strip()
    elif scheme.lower() == "basic":
        try:
            token = base64.b64decode(value.strip()).decode().partition(":")[2]
        except ValueError:
            token = ""
    if not token or not hmac.compare_digest(token.encode(), (settings.api_token or "").encode()):
        raise HTTPException(401, "missing or wrong API token (Authorization: Bearer <token>)",
                            headers={"WWW-Authenticate": "Bearer"})


def decode(name: str, data: bytes, settings: ServeSettings) -> np.ndarray:
    try:
        return load_image(data, max_pixels=int(settings.max_megapixels * 1e6))
    except ImageTooLarge as e:
        raise HTTPException(413, f"{name}: {e.reason}") from e
    except ImageError as e:
        raise HTTPException(400, f"{name}: {e.reason}") from e


async def score_arrays(ctx: ScoringContext, items: list[tuple[str, str | None, np.ndarray]], heatmap: bool,
                       mask: bool) -> ScoreResponse:
    """Score decoded images (batched with other requests) and build the per-image answers."""
    size = ctx.handle.served.model.config.image_size
    tensors = await asyncio.to_thread(lambda: [image_tensor(img, size) for _, _, img in items])
    scored = await asyncio.gather(*(ctx.score_one((t, cat)) for t, (_, cat, _) in zip(tensors, items, strict=True)))

    def build() -> list[ImageScore]:
        out = []
        for (name, category, img), s in zip(items, scored, strict=True):
            p = s.prediction
            h, w = img.shape[:2]
            res = ImageScore(name=name, category=category, score=p.score, normalised_score=p.normalised_score,
                             threshold=p.threshold, decision=p.decision, model_version=s.served.version,
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

"""The scorer's HTTP API (FastAPI): ``/v1/score``, ``/v1/model``, ``/v1/health``, and the Label
Studio ML-backend routes under ``/ls``.

The app is built around a :class:`ScoringContext`, so the same routes run inside the Ray Serve
deployment (where ``score_one`` is a ``@serve.batch`` method) and in-process for tests.
Bad input is answered with a 4xx that names the file and the reason; it never reaches the model.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from pydantic import BaseModel, Field, ValidationError

from defectloop.data import ImageError, ImageTooLarge, load_image
from defectloop.features import image_tensor
from defectloop.labeling.brush import BrushRLE, MaskCodec
from defectloop.labeling.inbox import EventInbox
from defectloop.scoring import ModelHandle, Scored, b64, decision, heatmap_png, predicted_mask
from defectloop.serve.settings import ServeSettings
from defectloop.store import read_uri

log = logging.getLogger(__name__)


@dataclass
class ScoringContext:
    """What the routes need: the model handle, a (batched) scorer for one image, settings, the inbox."""

    handle: ModelHandle
    score_one: Callable[[torch.Tensor], Awaitable[Scored]]
    settings: ServeSettings
    inbox: EventInbox
    codec: MaskCodec = BrushRLE()


# ----- schemas -------------------------------------------------------------------------------
class ImageRef(BaseModel):
    uri: str = Field(description="s3://bucket/key, or a local path below the service's allowed_roots")
    category: str | None = Field(None, description="product category: selects the calibrated threshold")
    name: str | None = None


class ScoreRequest(BaseModel):
    images: list[ImageRef] = Field(min_length=1)


class Mask(BaseModel):
    format: Literal["rle"] = "rle"
    rle: list[int] = Field(description="Label Studio brush RLE over the image's H x W x 4 RGBA array")
    width: int
    height: int
    pixels: int = Field(description="number of pixels predicted defective")


class ImageScore(BaseModel):
    name: str
    category: str | None
    score: float = Field(description="anomaly score (higher = more anomalous): the mean of the most "
                                     "anomalous 32 px window (at 256 px) of the smoothed map")
    normalised_score: float = Field(description="score mapped to (0, 1) with the category threshold at 0.5")
    threshold: float | None
    decision: Literal["normal", "anomalous", "unknown"]
    model_version: str
    width: int
    height: int
    heatmap_png: str | None = Field(None, description="base64 PNG, jet colours, pixel threshold at mid-scale")
    mask: Mask | None = None


class ScoreResponse(BaseModel):
    model_version: str
    results: list[ImageScore]


class ModelInfo(BaseModel):
    model_version: str
    kind: str
    backbone: str
    image_size: int
    categories: list[str]
    normal_bank_size: int
    abnormal_bank_size: int
    abnormal_annotations: int
    thresholds: dict[str, float]
    loaded_at: float
    reload_error: str | None


# ----- helpers -------------------------------------------------------------------------------
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
    scored = await asyncio.gather(*(ctx.score_one(t) for t in tensors))

    def build() -> list[ImageScore]:
        out = []
        for (name, category, img), s in zip(items, scored, strict=True):
            model = s.served.model
            h, w = img.shape[:2]
            t = model.threshold(category)
            res = ImageScore(name=name, category=category, score=s.score, normalised_score=model.normalise(s.score, category),
                             threshold=t, decision=decision(s.score, t), model_version=s.served.label, width=w, height=h)
            if heatmap:
                res.heatmap_png = b64(heatmap_png(s.amap, model.pixel_threshold(category), w, h))
            if mask:
                m = predicted_mask(s.amap, model.pixel_threshold(category), w, h)
                res.mask = Mask(rle=ctx.codec.encode(m), width=w, height=h, pixels=int(m.sum()))
            out.append(res)
        return out

    results = await asyncio.to_thread(build)
    return ScoreResponse(model_version=results[0].model_version, results=results)


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_request_mb`` (413), counted as they arrive."""

    def __init__(self, app, get_limit: Callable[[], int]):
        self.app = app
        self.get_limit = get_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.get_limit()
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            from starlette.responses import JSONResponse

            return await JSONResponse({"detail": f"request body over the {limit} byte limit"}, 413)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"request body over the {limit} byte limit")
            return message

        return await self.app(scope, limited, send)


SCORE_BODY = {
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "category": {"type": "string", "description": "category of every image (optional)"}}}},
        "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
            "images": {"type": "array", "items": ImageRef.model_json_schema()}}}},
    }}}


def build_app(ctx: ScoringContext) -> FastAPI:
    from defectloop.serve.ml_backend import build_router

    app = FastAPI(title="defectloop scorer", version="1",
                  description="Anomaly scores, heatmaps and predicted defect masks for inspection images, from "
                              "the unified model in the registry. Authenticate with `Authorization: Bearer <token>`.")
    app.state.ctx = ctx
    app.add_middleware(BodyLimit, get_limit=lambda: int(ctx.settings.max_request_mb * 2**20))
    auth = [Depends(require_token)]

    @app.get("/v1/health", summary="Liveness and the model version in force (no auth)")
    def health() -> dict:
        try:
            label = ctx.handle.served.label
        except Exception as e:  # no loadable model at all
            raise HTTPException(503, f"no model loaded: {e}") from e
        return {"status": "ok", "model_version": label, "reload_error": ctx.handle.last_error}

    @app.get("/v1/model", response_model=ModelInfo, dependencies=auth, summary="The model being served")
    def model_info() -> ModelInfo:
        served = ctx.handle.served
        m = served.model
        return ModelInfo(
            model_version=served.label, kind=m.kind, backbone=m.config.backbone, image_size=m.config.image_size,
            categories=sorted(c for c in m.calibration if c != "*"),
            normal_bank_size=len(m.normal_bank) if m.normal_bank is not None else 0,
            abnormal_bank_size=len(m.abnormal_bank), abnormal_annotations=len(m.abnormal_bank.annotations),
            thresholds={c: v["threshold"] for c, v in m.calibration.items()}, loaded_at=served.loaded_at,
            reload_error=ctx.handle.last_error)

    @app.post("/v1/score", response_model=ScoreResponse, dependencies=auth, openapi_extra=SCORE_BODY,
              summary="Score images: multipart files (field `files`, repeated) or JSON storage URIs")
    async def score(request: Request,
                    heatmap: bool = Query(False, description="include a heatmap PNG (base64) per image"),
                    mask: bool = Query(False, description="include the predicted defect mask (brush RLE)"),
                    category: str | None = Query(None, description="category of every image")) -> ScoreResponse:
        settings = ctx.settings
        ctype = request.headers.get("content-type", "")
        items: list[tuple[str, str | None, np.ndarray]] = []
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=settings.max_images + 1, max_fields=settings.max_images + 10)
            files = [f for f in form.getlist("files") if not isinstance(f, str)]
            category = category or (form.get("category") if isinstance(form.get("category"), str) else None)
            if not files:
                raise HTTPException(400, "no images: send one or more files in the multipart field `files`")
            if len(files) > settings.max_images:
                raise HTTPException(413, f"{len(files)} images in one request; the limit is {settings.max_images}")
            raw = [(f.filename or f"files[{i}]", category, await f.read()) for i, f in enumerate(files)]
        elif ctype.startswith("application/json"):
            try:
                req = ScoreRequest.model_validate_json(await request.body())
            except ValidationError as e:
                raise HTTPException(422, f"malformed JSON request: {e.errors(include_url=False)[:3]}") from e
            if len(req.images) > settings.max_images:
                raise HTTPException(413, f"{len(req.images)} images in one request; the limit is {settings.max_images}")

            def fetch(ref: ImageRef) -> bytes:
                try:
                    return read_uri(ref.uri, settings.allowed_roots)
                except PermissionError as e:
                    raise HTTPException(403, str(e)) from e
                except (OSError, ValueError) as e:
                    raise HTTPException(400, f"{ref.uri}: cannot read ({e})") from e
                except Exception as e:  # botocore errors: the storage said no
                    raise HTTPException(502, f"{ref.uri}: storage error ({type(e).__name__}: {e})") from e

            raw = [(ref.name or ref.uri, ref.category or category, await asyncio.to_thread(fetch, ref))
                   for ref in req.images]
        else:
            raise HTTPException(415, "send multipart/form-data (field `files`) or application/json ({\"images\": [...]})")
        items = await asyncio.to_thread(lambda: [(n, c, decode(n, data, settings)) for n, c, data in raw])
        return await score_arrays(ctx, items, heatmap, mask)

    app.include_router(build_router(ctx), prefix="/ls")
    return app

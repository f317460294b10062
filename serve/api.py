"""The scorer's HTTP API (FastAPI): ``/v1/score``, ``/v1/model``, ``/v1/health``, plus the Label
Studio ML-backend routes of ``serve.ml_backend`` under ``/ls``.

Bad input is answered with a 4xx that names the file and the reason; it never reaches the model.
"""

from __future__ import annotations

import asyncio
import logging
import resource

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from defectloop.models import AbnormalMemory
from defectloop.serve.context import ScoringContext, decode, require_token, score_arrays
from defectloop.serve.ml_backend import build_router
from defectloop.serve.schemas import BanksInfo, ImageRef, ModelInfo, ScoreRequest, ScoreResponse
from defectloop.store import FileTooLarge, read_uri

log = logging.getLogger(__name__)


SCORE_BODY = {
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "category": {"type": "string", "description": "category of every image (optional)"}}}},
        "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
            "images": {"type": "array", "items": ImageRef.model_json_schema()}}}},
    }}}


def build_app(ctx: ScoringContext) -> FastAPI:
    app = FastAPI(title="defectloop scorer", version="1",
                  description="Anomaly scores, heatmaps and predicted defect masks for inspection images, from "
                              "the unified model in the registry. Authenticate with `Authorization: Bearer <token>`.")
    app.state.ctx = ctx
    auth = [Depends(require_token)]

    @app.get("/v1/health", summary="Liveness and the model version in force (no auth)")
    def health() -> dict:
        """Open to anyone, so it names no file and no error text: ``reload_failed`` says a newer
        version could not be loaded (why is in ``/v1/model``, authenticated, and the log); ``ready``
        is false while every thread that reads request images is busy (``IOPool``)."""
        try:
            served = ctx.handle.served
        except Exception as e:  # no loadable model at all
            log.error("health: no model loaded: %s", e)
            raise HTTPException(503, "no model loaded (see the service's log)") from e
        ready = not ctx.io.saturated  # while draining, the gateway answers 503 for this replica
        return {"status": "ok" if ready else "saturated", "ready": ready, "model_version": served.version,
                "bank_version": served.bank, "reload_failed": ctx.handle.last_error is not None}

    @app.get("/v1/model", response_model=ModelInfo, dependencies=auth, summary="The model being served")
    def model_info() -> ModelInfo:
        served = ctx.handle.served
        m = served.model
        abnormal = m.abnormal_bank if isinstance(m, AbnormalMemory) else None
        return ModelInfo(
            model_version=served.version, bank_version=served.bank, kind=m.kind, backbone=m.config.backbone, image_size=m.config.image_size,
            categories=m.calibration.categories(),
            normal_bank_size=len(m.normal_bank) if m.normal_bank is not None else 0,
            abnormal_bank_size=len(abnormal) if abnormal is not None else 0,
            abnormal_annotations=len(abnormal.annotations) if abnormal is not None else 0,
            normal_evidence_images=len(m.normal_evidence.annotations) if isinstance(m, AbnormalMemory) else 0,
            thresholds={c: e.threshold for c, e in m.calibration.entries.items()}, loaded_at=served.loaded_at,
            reload_error=ctx.handle.last_error, peak_memory_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

    @app.get("/v1/banks", response_model=BanksInfo, dependencies=auth,
             summary="The served banks per category, and the live loop (pending, quarantined, retraining)")
    async def banks() -> BanksInfo:
        served = ctx.handle.served
        loop = await ctx.loop_status() if ctx.loop_status is not None else None
        quarantine = (loop or {}).get("quarantined", [])
        return BanksInfo(model_version=served.version, bank_version=served.bank,
                         categories=served.model.memory_by_category(),
                         pending_events=None if loop is None else loop.get("pending_events"),
                         quarantined=len(quarantine), quarantine=quarantine,
                         retraining=None if loop is None else loop.get("retraining"), loop=loop)

    @app.post("/v1/score", response_model=ScoreResponse, dependencies=auth, openapi_extra=SCORE_BODY,
              summary="Score images: multipart files (field `files`, repeated) or JSON storage URIs")
    async def score(request: Request,
                    heatmap: bool = Query(False, description="include a heatmap PNG (base64) per image"),
                    mask: bool = Query(False, description="include the predicted defect mask (brush RLE)"),
                    category: str | None = Query(None, description="category of every image")) -> ScoreResponse:
        settings = ctx.settings
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=settings.max_images + 1, max_fields=settings.max_images + 10)
            except StarletteHTTPException as e:  # Starlette's multipart limits answer 400; too many is 413
                if "Too many" in str(e.detail):
                    raise HTTPException(413, f"more than {settings.max_images} images or fields in one request") from e
                raise
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
                    return read_uri(ref.uri, settings.allowed_roots, settings.max_request_bytes)
                except PermissionError as e:
                    raise HTTPException(403, str(e)) from e
                except FileTooLarge as e:
                    raise HTTPException(413, str(e)) from e
                except (OSError, ValueError) as e:
                    raise HTTPException(400, f"{ref.uri}: cannot read ({e})") from e
                except Exception as e:  # botocore errors: the storage said no
                    raise HTTPException(502, f"{ref.uri}: storage error ({type(e).__name__}: {e})") from e

            raw = [(ref.name or ref.uri, ref.category or category, await ctx.io.run(fetch, ref))
                   for ref in req.images]
        else:
            raise HTTPException(415, "send multipart/form-data (field `files`) or application/json ({\"images\": [...]})")
        items = await asyncio.to_thread(lambda: [decode(n, c, data, ctx) for n, c, data in raw])
        return await score_arrays(ctx, items, heatmap, mask)

    app.include_router(build_router(ctx), prefix="/ls")
    return app

"""Label Studio's ML-backend protocol, served under ``/ls`` next to the scoring API.

Connect it in a project's Model settings with the URL ``http://<scorer>/ls`` (basic auth, any
user, the API token as password). Label Studio then calls ``/setup`` (learns the model version),
``/predict`` (one prediction per task, in order: the anomaly score and the predicted defect mask
as a brush region, plus the normal/anomalous verdict when the config has Choices) and
``/webhook`` (every project event: annotation events and START_TRAINING are queued in the event
inbox, the rest ignored; nothing slow happens inside the request).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import APIRouter, Body, Depends, HTTPException, Request
from pydantic import BaseModel

from defectloop.labeling.client import StudioClient, StudioError
from defectloop.labeling.events import FEEDBACK_ACTIONS, InvalidEvent, parse_event
from defectloop.labeling.label_config import LabelConfig, prediction_regions
from defectloop.serve.context import Decoded, ScoringContext, decode, require_token, score_arrays

log = logging.getLogger(__name__)


class PredictRequest(BaseModel):
    tasks: list[dict[str, Any]]
    project: str | None = None
    label_config: str | None = None
    params: dict[str, Any] | None = None


def build_router(ctx: ScoringContext) -> APIRouter:
    router = APIRouter(tags=["Label Studio ML backend"])
    auth = [Depends(require_token)]
    projects: dict[str, dict] = {}  # project uid -> what /setup told us (schema, hostname, access token)
    clients: dict[tuple[str, str], StudioClient] = {}

    def studio(project: str | None) -> StudioClient:
        s = ctx.settings
        seen = projects.get(str(project), {})
        url = s.label_studio_url or seen.get("hostname")
        token = s.label_studio_token or seen.get("access_token")
        if not url or not token:
            raise HTTPException(400, "cannot fetch task images: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY "
                                     "for the scorer, or let Label Studio call /setup first")
        key = (url, token)
        if key not in clients:
            clients[key] = StudioClient(url, token, retries=2)
        return clients[key]

    @router.get("/health", summary="Label Studio health check (no auth; must answer within 1 s)")
    def health() -> dict:
        served = ctx.handle._served  # never load a model inside a 1 s health check
        return {"status": "UP", "model_class": "defectloop", "model_version": served.version if served else None}

    @router.post("/setup", dependencies=auth, summary="Project connected: returns the model version")
    def setup(body: dict[str, Any] = Body(...)) -> dict:
        schema = body.get("schema")
        if schema:
            try:
                LabelConfig.parse(schema)
            except ValueError as e:
                raise HTTPException(400, f"label config not usable by defectloop: {e}") from e
        projects[str(body.get("project"))] = {"schema": schema, "hostname": body.get("hostname"),
                                              "access_token": body.get("access_token")}
        return {"model_version": ctx.handle.served.version}

    @router.post("/predict", dependencies=auth, summary="One prediction per task, in order")
    async def predict(req: PredictRequest) -> dict:
        schema = req.label_config or projects.get(str(req.project), {}).get("schema")
        if not schema:
            raise HTTPException(400, "no label config: send label_config or connect the project (/setup) first")
        try:
            config = LabelConfig.parse(schema)
        except ValueError as e:
            raise HTTPException(400, str(e)) from e
        if len(req.tasks) > 4 * ctx.settings.max_images:
            raise HTTPException(413, f"{len(req.tasks)} tasks in one request; the limit is {4 * ctx.settings.max_images}")
        label = ctx.handle.served.version

        def load(task: dict) -> Decoded | str:
            data = task.get("data")
            name = f"task {task.get('id')}"
            if not isinstance(data, dict):
                return f"{name}: `data` is a JSON object with the image under {config.image_key!r}, not {type(data).__name__}"
            uri = data.get(config.image_key)
            if not isinstance(uri, str) or not uri:
                return f"{name}: no image in data[{config.image_key!r}]"
            try:
                raw = studio(req.project).fetch(uri, task.get("id"))
                return decode(name, data.get("category"), raw, ctx)
            except HTTPException as e:
                return str(e.detail)
            except (StudioError, ValueError) as e:
                return f"{name}: {e}"

        loaded = await asyncio.gather(*(ctx.io.run(load, t) for t in req.tasks))
        good = [x for x in loaded if not isinstance(x, str)]
        scored = iter((await score_arrays(ctx, good, heatmap=False, mask=config.brush is not None)).results
                      if good else [])
        results = []
        for task, x in zip(req.tasks, loaded, strict=True):
            if isinstance(x, str):  # keep the order: an empty prediction that says why
                log.warning("predict: %s", x)
                results.append({"result": [], "score": None, "model_version": label, "error": x})
                continue
            res = next(scored)
            mask = res.mask.rle if res.mask is not None and res.mask.pixels > 0 else None
            regions = prediction_regions(config, task.get("id"), res.normalised_score, res.decision == "anomalous",
                                         mask, res.width, res.height)
            results.append({"result": regions, "score": res.normalised_score, "model_version": res.model_version})
        return {"results": results}

    @router.post("/webhook", dependencies=auth, status_code=201,
                 summary="Label Studio events: annotation changes, task imports and START_TRAINING are queued, others ignored")
    async def webhook(request: Request) -> dict:
        limit = int(ctx.settings.max_event_mb * 2**20)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise HTTPException(413, f"webhook event over the {ctx.settings.max_event_mb:g} MB limit")
        raw = await request.body()
        if len(raw) > limit:
            raise HTTPException(413, f"webhook event over the {ctx.settings.max_event_mb:g} MB limit")
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise HTTPException(400, f"a webhook payload is JSON: {e}") from e
        if not isinstance(body, dict) or not isinstance(body.get("action"), str):
            raise HTTPException(400, "a webhook payload is a JSON object with an `action`")
        if body["action"] not in FEEDBACK_ACTIONS:
            return {"status": "ignored", "action": body["action"]}
        try:
            event = parse_event(body)
        except InvalidEvent as e:
            raise HTTPException(422, f"malformed {body['action']} event: {e}") from e
        return {"status": "queued", "event_id": await asyncio.to_thread(ctx.inbox.put, body, event.identity())}

    @router.post("/train", dependencies=auth, summary="Legacy 'Start training': queued like START_TRAINING")
    def train(body: dict[str, Any] = Body(default_factory=dict)) -> dict:
        event_id = ctx.inbox.put({"action": "START_TRAINING", "project": body.get("project"), "legacy": True})
        return {"job": event_id}

    @router.get("/versions", dependencies=auth, summary="Model versions in the registry")
    def versions() -> dict:
        reg = ctx.handle.registry
        return {"versions": reg.ids() if reg else [ctx.handle.served.version]}

    return router

"""The scorer's HTTP routes in-process (no Ray): answers, auth, limits and every kind of bad input."""

import asyncio
import base64
import io
import json
import os
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from defectloop.labeling.brush import BrushRLE
from defectloop.labeling.inbox import EventInbox
from defectloop.scoring import ModelHandle
from defectloop.serve.api import build_app
from defectloop.serve.context import ScoringContext
from defectloop.serve.gateway import local_gateway
from defectloop.serve.settings import ServeSettings

TOKEN = "s3cret-token"


@pytest.fixture()
def ctx(served_copy, tmp_path):
    root = served_copy
    settings = ServeSettings.load(env={}, model=str(root), api_token=TOKEN, max_images=4, max_request_mb=1,
                                  max_megapixels=1, allowed_roots=[str(tmp_path / "pool")])
    handle = ModelHandle(root)

    async def score_one(item):
        image, category, grid = item
        return (await asyncio.to_thread(handle.score, [image], [category], [grid]))[0]

    return ScoringContext(handle, score_one, settings, EventInbox(settings.inbox_dir()))


@pytest.fixture()
def client(ctx):
    c = TestClient(local_gateway(build_app(ctx), lambda: ctx.settings))  # the path of every request: gateway, then app
    c.headers["Authorization"] = f"Bearer {TOKEN}"
    return c


def png(arr: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def defect_png(tiny_data):
    return next(p for p in sorted(tiny_data.glob("*/test/*/*.png")) if p.parent.name != "good").read_bytes()


def test_score_multipart_with_mask_and_heatmap(client, defect_png):
    r = client.post("/v1/score?heatmap=true&mask=true", files=[("files", ("a.png", defect_png, "image/png")),
                                                                ("files", ("b.png", defect_png, "image/png"))])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "v0001" and len(body["results"]) == 2
    res = body["results"][0]
    assert res["name"] == "a.png" and res["decision"] == "anomalous" and 0.5 < res["normalised_score"] < 1
    mask = BrushRLE().decode(res["mask"]["rle"], res["height"], res["width"])
    assert mask.sum() == res["mask"]["pixels"] > 0
    assert Image.open(io.BytesIO(base64.b64decode(res["heatmap_png"]))).size == (res["width"], res["height"])


def test_modes_and_formats_are_accepted(client):
    rng = np.random.default_rng(0)
    grey16 = (rng.random((64, 80)) * 65535).astype(np.uint16)
    files = [("files", ("g.png", png(rng.integers(0, 255, (64, 64), np.uint8)), "image/png")),
             ("files", ("rgba.png", png(rng.integers(0, 255, (50, 70, 4), np.uint8)), "image/png")),
             ("files", ("x.jpg", png(rng.integers(0, 255, (40, 40, 3), np.uint8), fmt="JPEG"), "image/jpeg")),
             ("files", ("d.tif", png(grey16, fmt="TIFF"), "image/tiff"))]
    r = client.post("/v1/score", files=files, params={"category": "tile"})
    assert r.status_code == 200, r.text
    assert [x["category"] for x in r.json()["results"]] == ["tile"] * 4
    assert {x["threshold_of"] for x in r.json()["results"]} == {"category"}
    unknown = client.post("/v1/score", files=files[:1], params={"category": "no-such-category"}).json()["results"][0]
    assert unknown["threshold_of"] == "all categories" and unknown["threshold"] is not None


def test_json_uris_only_below_allowed_roots(client, ctx, tmp_path, defect_png):
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "p.png").write_bytes(defect_png)
    r = client.post("/v1/score", json={"images": [{"uri": str(pool / "p.png"), "category": "disc"}]})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["category"] == "disc"
    secret = tmp_path / "secret.png"
    secret.write_bytes(defect_png)
    assert client.post("/v1/score", json={"images": [{"uri": str(secret)}]}).status_code == 403
    assert client.post("/v1/score", json={"images": [{"uri": str(pool / "../secret.png")}]}).status_code == 403
    assert client.post("/v1/score", json={"images": [{"uri": str(pool / "none.png")}]}).status_code == 400
    # a FIFO under an allowed root would block its reading thread forever (six exhausted the pool)
    os.mkfifo(pool / "pipe.png")
    t0 = time.monotonic()
    r = client.post("/v1/score", json={"images": [{"uri": str(pool / "pipe.png")}]})
    assert r.status_code == 400 and "not a regular file" in r.json()["detail"] and time.monotonic() - t0 < 5
    (pool / "big.png").write_bytes(b"\0" * (2 * 2**20))  # over this service's 1 MB request limit
    assert client.post("/v1/score", json={"images": [{"uri": str(pool / "big.png")}]}).status_code == 413


@pytest.mark.parametrize("name,data,status,words", [
    ("text.png", b"this is not an image", 400, "not a readable image"),
    ("empty.png", b"", 400, "empty file"),
    ("cut.png", None, 400, "truncated"),
    ("huge.png", "huge", 413, "too large"),
])
def test_bad_images_get_4xx_naming_the_file(client, defect_png, name, data, status, words):
    if data is None:
        data = defect_png[: len(defect_png) // 2]
    elif data == "huge":  # 2000 x 1000 px: over the 1 MP limit of this service, tiny as a file
        data = png(np.zeros((1000, 2000), np.uint8))
    r = client.post("/v1/score", files=[("files", ("ok.png", defect_png, "image/png")), ("files", (name, data, "image/png"))])
    assert r.status_code == status, r.text
    assert name in r.json()["detail"] and words in r.json()["detail"]
    assert client.post("/v1/score", files=[("files", ("ok.png", defect_png, "image/png"))]).status_code == 200


def test_request_limits_and_malformed_requests(client, defect_png):
    too_many = [("files", (f"{i}.png", defect_png, "image/png")) for i in range(5)]
    assert client.post("/v1/score", files=too_many).status_code == 413
    hundred = [("files", (f"{i}.png", b"x", "image/png")) for i in range(100)]  # past Starlette's own limit
    assert client.post("/v1/score", files=hundred).status_code == 413
    big = [("files", ("big.bin", b"\0" * (2 * 2**20), "image/png"))]
    r = client.post("/v1/score", files=big)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert client.post("/v1/score", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    assert client.post("/v1/score", json={"images": []}).status_code == 422
    assert client.post("/v1/score", json={"pictures": ["x"]}).status_code == 422
    assert client.post("/v1/score", content=b"raw", headers={"content-type": "image/png"}).status_code == 415
    assert client.post("/v1/score", files=[("other", ("a.png", defect_png, "image/png"))]).status_code == 400


def test_auth(client, defect_png):
    anon = TestClient(client.app)
    assert anon.get("/v1/health").status_code == 200
    assert anon.get("/ls/health").status_code == 200
    assert anon.get("/v1/model").status_code == 401
    assert anon.post("/v1/score", files=[("files", ("a.png", defect_png, "image/png"))]).status_code == 401
    assert anon.get("/v1/model", headers={"Authorization": "Bearer wrong"}).status_code == 401
    basic = base64.b64encode(f"labelstudio:{TOKEN}".encode()).decode()
    assert anon.get("/v1/model", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    info = client.get("/v1/model").json()
    assert info["model_version"] == "v0001" and info["kind"] == "dmad" and info["normal_bank_size"] > 0
    assert info["normal_evidence_images"] == 0
    assert set(info["categories"]) == {"tile", "disc", "mesh"}
    # no token: 401 before the body is read (over the body limit, it would otherwise be a 413)
    huge = anon.post("/ls/predict", content=b"{" * (2 * 2**20), headers={"content-type": "application/json"})
    assert huge.status_code == 401
    assert anon.post("/ls/webhook", json={"action": "ANNOTATION_CREATED"}).status_code == 401
    health = anon.get("/v1/health").json()
    assert health["reload_failed"] is False and "reload_error" not in health


def test_one_client_cannot_take_a_replica(ctx):
    """Past ``max_requests_per_client`` requests in flight, a client gets 429 (before its body is
    read) while another client is still served; a finished request frees its place."""
    from defectloop.serve.gateway import TokenGate

    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    settings = ctx.settings.updated({"max_requests_per_client": 2})
    gate = TokenGate(slow_app, lambda: settings)

    async def call(client: str, path: str = "/v1/score", token: str = TOKEN) -> int:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "path": path, "client": (client, 1234),
                 "headers": [(b"authorization", f"Bearer {token}".encode())]}
        await gate(scope, receive, send)
        return sent[0]["status"]

    async def scenario() -> None:
        first = [asyncio.create_task(call("10.0.0.1")) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert await call("10.0.0.1") == 429  # answered at once, while its two wait
        assert await call("10.0.0.1", token="wrong") == 401  # auth first
        other = asyncio.create_task(call("10.0.0.2"))
        await asyncio.sleep(0.05)
        assert not other.done() and gate.in_flight == {"10.0.0.1": 2, "10.0.0.2": 1}
        release.set()
        assert await asyncio.gather(*first, other) == [200, 200, 200]
        assert gate.in_flight == {} and await call("10.0.0.1") == 200
        assert await call("10.0.0.1", path="/v1/health", token="") == 200  # open paths: no token needed
        nonlocal settings
        settings = settings.updated({"draining": True})  # stopping: 503 everywhere, health included
        assert await call("10.0.0.1") == 503 and await call("10.0.0.1", path="/v1/health", token="") == 503

    asyncio.run(scenario())


def test_health_names_no_file_when_a_reload_fails(client, ctx):
    assert ctx.handle.served  # loaded: what follows is a later reload's failure
    ctx.handle.last_error = "OSError: /secret/registry/versions/v0002/weights.safetensors: corrupt"
    health = TestClient(client.app).get("/v1/health").json()
    assert health["reload_failed"] is True and "/secret" not in str(health)
    assert "/secret" in client.get("/v1/model").json()["reload_error"]  # with the token: why


def test_openapi_documents_both_request_bodies(client):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/score"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert "/ls/predict" in spec["paths"]
    assert {s["scheme"] for s in spec["components"]["securitySchemes"].values()} == {"bearer", "basic"}
    assert spec["paths"]["/v1/score"]["post"]["security"] and "security" not in spec["paths"]["/v1/health"]["get"]


def test_ml_backend_setup_and_webhook(client, ctx):
    from defectloop.labeling.label_config import build_label_config

    r = client.post("/ls/setup", json={"project": "3.1700000000", "schema": build_label_config()})
    assert r.status_code == 200 and r.json()["model_version"] == "v0001"
    bad = client.post("/ls/setup", json={"project": "3.1", "schema": "<View><Text name='t' value='$t'/></View>"})
    assert bad.status_code == 400 and "Image" in bad.json()["detail"]

    event = {"action": "ANNOTATION_CREATED", "annotation": {"id": 7, "task": 1, "result": []}}
    r = client.post("/ls/webhook", json=event)
    assert r.status_code == 201 and r.json()["status"] == "queued"
    again = client.post("/ls/webhook", json=event)  # Label Studio delivering it twice: stored once
    assert again.status_code == 201 and again.json()["event_id"] == r.json()["event_id"]
    edited = client.post("/ls/webhook", json={**event, "annotation": {**event["annotation"], "updated_at": "2026-12-06T10:00:00Z"}})
    assert edited.json()["event_id"] != r.json()["event_id"]  # an edit is another event
    ctx.inbox.done(edited.json()["event_id"])
    big = {"action": "ANNOTATION_CREATED", "annotation": {"id": 8, "task": 1, "result": [{"x": "y" * 2**20}]}}
    assert client.post("/ls/webhook", json=big).status_code == 413  # over the size limit
    assert client.post("/ls/webhook", json={"action": "PROJECT_UPDATED"}).json()["status"] == "ignored"
    assert client.post("/ls/webhook", json={"action": "TASKS_CREATED", "tasks": [{"data": {}}]}).status_code == 422
    for payload in (b"[1, 2]", b"{\"no_action\": 1}", b"{broken"):
        assert client.post("/ls/webhook", content=payload, headers={"content-type": "application/json"}).status_code in (400, 422)
    assert TestClient(client.app).post("/ls/webhook", json=event).status_code == 401
    assert client.post("/ls/train", json={"project": "3.1"}).status_code == 200
    assert [e["action"] for _, e in ctx.inbox.pending()] == ["ANNOTATION_CREATED", "START_TRAINING"]
    assert json.dumps(ctx.inbox.pending()[0][1]) == json.dumps(event)


def test_settings_from_file_env_and_overrides(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("model: /from/file\nmax_images: 7\nauth: false\n")
    s = ServeSettings.load(f, env={"DEFECTLOOP_MAX_IMAGES": "9", "LABEL_STUDIO_URL": "http://ls:8080",
                                   "LABEL_STUDIO_API_KEY": "k"}, poll_s=5)
    assert (s.model, s.max_images, s.auth, s.poll_s, s.label_studio_url) == ("/from/file", 9, False, 5, "http://ls:8080")
    with pytest.raises(ValueError, match="no API token"):
        ServeSettings.load(env={"DEFECTLOOP_MODEL": "/m"})
    with pytest.raises(ValueError, match="unknown"):
        ServeSettings.load(env={}, model="/m", auth=False, colour="red")
    with pytest.raises(ValueError, match="restart"):
        s.updated({"threads": 3})
    assert s.updated({"max_batch_size": 4}).max_batch_size == 4


def test_image_reads_wait_in_a_pool_of_their_own(client, ctx):
    """Reads that hang fill the I/O pool, not the threads scoring runs in; health says not ready."""
    import threading

    from defectloop.serve.context import IOPool

    release = threading.Event()

    async def main() -> None:
        pool = IOPool(2)
        reads = [asyncio.create_task(pool.run(release.wait, 10)) for _ in range(3)]
        await asyncio.sleep(0.2)
        assert pool.saturated and pool.busy == 3
        assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), 5) == 42  # scoring's threads are free
        release.set()
        assert all(await asyncio.gather(*reads)) and not pool.saturated

    asyncio.run(main())
    ctx.io.busy = ctx.io.workers
    health = client.get("/v1/health").json()
    assert (health["status"], health["ready"]) == ("saturated", False)
    ctx.io.busy = 0
    assert client.get("/v1/health").json()["ready"] is True

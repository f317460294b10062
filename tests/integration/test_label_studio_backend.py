"""The scorer as Label Studio's ML backend, against a real Label Studio server."""

import shutil
import time

import httpx
import numpy as np
import pytest
from label_studio_sdk import LabelStudio

from defectloop.data import load_image
from defectloop.labeling.brush import BrushRLE
from defectloop.labeling.label_config import LabelConfig, build_label_config

pytestmark = pytest.mark.slow


def test_label_studio_gets_predictions_from_the_scorer(label_studio, scorer, tiny_data):
    ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    pool = label_studio.root / "pool"
    pool.mkdir()
    tasks, truth = [], []
    for i, p in enumerate(sorted(tiny_data.glob("*/test/*/*.png"))[::2]):
        name = f"{p.parts[-4]}_{p.parent.name}_{p.name}"
        shutil.copy(p, pool / name)
        tasks.append({"image": f"/data/local-files/?d=pool/{name}", "category": p.parts[-4], "n": i})
        truth.append(p.parent.name != "good")
    project = ls.projects.create(title="defectloop it", label_config=build_label_config(["scratch", "blob"]))
    ls.import_storage.local.create(project=project.id, path=str(pool), title="pool", use_blob_urls=True)
    ls.projects.import_tasks(id=project.id, request=tasks)

    backend = ls.ml.create(project=project.id, url=f"{scorer.url}/ls", title="defectloop",
                           auth_method="BASIC_AUTH", basic_auth_user="labelstudio", basic_auth_pass=scorer.token)
    assert ls.ml.get(id=backend.id).state == "CO", "backend did not connect (health/setup)"
    ls.actions.create(id="retrieve_tasks_predictions", project=project.id, selected_items={"all": True, "excluded": []})

    label = httpx.get(f"{scorer.url}/v1/health").json()["model_version"]
    config = LabelConfig.parse(build_label_config(["scratch", "blob"]))
    stored = {t.data["n"]: t for t in ls.tasks.list(project=project.id, fields="all")}
    assert len(stored) == len(tasks)
    scores, hits = [], []
    for n, task in sorted(stored.items()):
        preds = ls.predictions.list(task=task.id)
        assert len(preds) == 1, f"task {n}: {len(preds)} predictions"
        pred = preds[0]
        assert pred.model_version == label and 0 < pred.score < 1
        scores.append(pred.score)
        by_type = {r["type"]: r for r in pred.result}
        assert by_type["choices"]["from_name"] == config.choices
        if "brushlabels" in by_type:
            r = by_type["brushlabels"]
            # the generic label: the ML backend scores an image alone, with no defect type to name
            assert (r["from_name"], r["to_name"], r["value"]["brushlabels"]) == (config.brush, config.image, ["defect"])
            h, w = load_image(pool / tasks[n]["image"].split("pool/")[1]).shape[:2]
            assert (r["original_width"], r["original_height"]) == (w, h)
            hits.append((n, BrushRLE().decode(r["value"]["rle"], h, w).sum()))
    truth = np.array(truth)
    scores = np.array(scores)
    assert scores[truth].mean() > scores[~truth].mean()
    assert sum(1 for n, px in hits if truth[n] and px > 0) >= truth.sum() // 2
    assert ls.ml.get(id=backend.id).model_version == label  # learned through /setup

    # a task imported later, read by id as the loop reads an import: no prediction is asked of the
    # scorer on the way (a single-task read would: Label Studio fills in a missing prediction there)
    from defectloop.labeling.project import LabelingProject

    before = {t.id for t in ls.tasks.list(project=project.id, fields="task_only")}
    ls.projects.import_tasks(id=project.id, request=[tasks[0], tasks[1]])
    first, second = sorted({t.id for t in ls.tasks.list(project=project.id, fields="task_only")} - before)
    read = list(LabelingProject(label_studio.url, label_studio.token, project.id).tasks([second, 10**7]))
    assert [t["id"] for t in read] == [second] and read[0]["data"]["n"] == tasks[1]["n"]
    assert not ls.predictions.list(task=second)
    ls.tasks.get(id=first)  # what the loop must not do
    assert len(ls.predictions.list(task=first)) == 1, "a single-task read no longer fetches a prediction"


def test_pool_in_s3_through_label_studio(label_studio, scorer, s3, tiny_data):
    """Images in an S3 bucket: Label Studio imports them (custom endpoint), shows them through presigned
    URLs, and the scorer fetches them through Label Studio to predict."""
    from defectloop.labeling.client import StudioClient
    from defectloop.store import open_store

    files = sorted(tiny_data.glob("mesh/test/*/*.png"))[:4]
    pool = open_store(f"s3://{s3.bucket}/ls-pool")
    for p in files:
        pool.upload_file(p, f"{p.parent.name}_{p.name}")
    ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = ls.projects.create(title="defectloop s3", label_config=build_label_config())
    env = s3.env()
    storage = ls.import_storage.s3.create(
        project=project.id, bucket=s3.bucket, prefix="ls-pool", regex_filter=r".*\.png", use_blob_urls=True,
        presign=True, presign_ttl=10, s3endpoint=s3.endpoint, region_name="us-east-1",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    ls.import_storage.s3.sync(id=storage.id)
    deadline = time.monotonic() + 60
    while len(tasks := list(ls.tasks.list(project=project.id, fields="all"))) < len(files):
        assert time.monotonic() < deadline, "S3 storage sync imported no tasks"
        time.sleep(1)
    client = StudioClient(label_studio.url, label_studio.token)
    raw = [t.data["image"] for t in ls.tasks.list(project=project.id, fields="all", resolve_uri=False)]
    assert sorted(raw) == sorted(f"s3://{s3.bucket}/ls-pool/{p.parent.name}_{p.name}" for p in files)
    # what an annotator's browser gets: the bytes in the bucket, through Label Studio's presigned redirect
    assert {client.fetch(t.data["image"], t.id) for t in tasks} == {p.read_bytes() for p in files}
    assert {client.fetch(uri, t.id) for uri, t in zip(raw, tasks, strict=True)} == {p.read_bytes() for p in files}

    ls.ml.create(project=project.id, url=f"{scorer.url}/ls", title="defectloop", auth_method="BASIC_AUTH",
                 basic_auth_user="labelstudio", basic_auth_pass=scorer.token)
    ls.actions.create(id="retrieve_tasks_predictions", project=project.id, selected_items={"all": True, "excluded": []})
    preds = [ls.predictions.list(task=t.id) for t in tasks]
    assert all(len(p) == 1 and p[0].result and 0 < p[0].score < 1 for p in preds), preds


class _Host:
    """A local HTTP server that records what it was asked; ``routes``: path -> (status, headers, body)."""

    def __init__(self, routes: dict[str, tuple[int, dict, bytes]] | None = None):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.routes, self.seen = routes or {}, []
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                host.seen.append(self.path)
                status, headers, body = host.routes.get(self.path.split("?")[0], (404, {}, b"secret internal page"))
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def log_message(self, *_):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_backend_fetches_from_label_studio_only(scorer, tiny_data):
    """/ls/predict names the images to fetch: only Label Studio's host (the one /setup gave, with the
    token) is fetched from; a URL elsewhere, a redirect elsewhere and an oversize or erroring image
    give a per-task error, the other host receives nothing and no upstream body comes back."""
    image = next(tiny_data.glob("mesh/test/good/*.png")).read_bytes()
    victim = _Host({"/": (200, {}, b"internal")})
    studio = _Host({"/data/ok.png": (200, {"Content-Type": "image/png"}, image),
                    "/data/moved.png": (302, {"Location": f"{victim.url}/"}, b""),
                    "/data/huge.png": (200, {"Content-Length": str(10**12)}, b"")})
    try:
        auth = {"Authorization": f"Bearer {scorer.token}"}
        setup = httpx.post(f"{scorer.url}/ls/setup", json={"project": "ssrf.1", "hostname": studio.url,
                                                           "access_token": "ls-token", "schema": build_label_config()},
                           headers=auth, timeout=30)
        assert setup.status_code == 200
        assert httpx.post(f"{scorer.url}/ls/setup", json={"project": "ssrf.1", "hostname": victim.url},
                          timeout=30).status_code == 401  # no token: the host cannot be repointed
        uris = ["/data/ok.png", f"{victim.url}/", "/data/moved.png", "/data/huge.png", "/data/missing.png",
                "file:///etc/passwd"]
        tasks = [{"id": i, "data": {"image": u, "category": "mesh"}} for i, u in enumerate(uris)]
        tasks += [{"id": 90, "data": ["not", "an", "object"]}, {"id": 91, "data": "text"}]
        r = httpx.post(f"{scorer.url}/ls/predict", json={"project": "ssrf.1", "tasks": tasks}, headers=auth, timeout=120)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == len(tasks) and results[0]["result"] and "error" not in results[0]
        errors = [res.get("error", "") for res in results[1:]]
        assert all(errors) and "not a host this service fetches from" in errors[0] and "not a host" in errors[1]
        assert "byte cap" in errors[2] and "HTTP 404" in errors[3] and "secret" not in r.text
        assert "only http(s)" in errors[4] and "not list" in errors[5] and "not str" in errors[6]
        assert victim.seen == [], "the scorer fetched from a host it was not configured for"
        assert studio.seen.count("/data/moved.png") == 1  # a redirect elsewhere is not retried either
    finally:
        victim.close()
        studio.close()

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

"""A Label Studio project for one image pool: bootstrap, tasks, predictions, annotations.

Bootstrap (``create``): the label config (Image + BrushLabels for the defect vocabulary + Choices
normal/anomalous), a storage so Label Studio can show the images (Local files below its document
root, or S3 with a custom endpoint), one task per image carrying its category and its place in the
pool ("source": what the retraining reads), and Data Manager tabs: the open tasks in the
policy's order (by prediction score), and the reviewed ones. Predictions carry the model version, and
the project's ``model_version`` is kept equal to it, without which Label Studio silently ignores
the scores when sorting and filtering.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from defectloop.labeling.label_config import LabelConfig, build_label_config

log = logging.getLogger(__name__)

MOST_ANOMALOUS_TAB = "Open: most anomalous first"
REVIEWED_TAB = "Reviewed"
#: the open tasks' tab of a policy whose order is not "most anomalous first"
QUEUE_TABS = {"random": "Open: random order (baseline)", "adaptive": "Open: likeliest defects of each category first",
              "per-category": "Open: most anomalous of each category first", "borderline": "Open: nearest the threshold first",
              "diverse": "Open: most anomalous, varied"}
#: the Data Manager's columns an annotator sees: thumbnail, category, score, the predicted verdict and mask
SHOWN_COLUMNS = ("id", "data.image", "data.category", "data.decision", "predictions_score")
HIDDEN_COLUMNS = ("data", "predictions_results", "inner_id", "completed_at", "total_annotations", "cancelled_annotations", "total_predictions",
                  "annotators", "annotations_results", "annotations_ids", "predictions_model_versions", "file_upload",
                  "storage_filename", "created_at", "updated_at", "updated_by", "avg_lead_time", "draft_exists",
                  "data.source", "comment_count", "unresolved_comment_count", "last_comment_updated_at", "comment_authors")


def tabs(policy: str) -> list[dict]:
    """The Data Manager tabs: open tasks in the policy's order (the prediction score is that order),
    and the reviewed ones. Only the shown columns, so the thumbnail and category need no scrolling;
    the task's source path (which names the defect in an MVTec folder) is never shown."""
    hidden = {"explore": [f"tasks:{c}" for c in HIDDEN_COLUMNS], "labeling": [f"tasks:{c}" for c in HIDDEN_COLUMNS]}

    def annotated(operator: str) -> dict:
        return {"conjunction": "and", "items": [{"filter": "filter:tasks:total_annotations", "operator": operator,
                                                 "type": "Number", "value": 0}]}

    return [{"title": QUEUE_TABS.get(policy, MOST_ANOMALOUS_TAB), "ordering": ["-tasks:predictions_score"],
             "filters": annotated("equal"), "hiddenColumns": hidden},
            {"title": REVIEWED_TAB, "ordering": ["-tasks:id"], "filters": annotated("greater"), "hiddenColumns": hidden}]


@dataclass(frozen=True)
class PoolImage:
    uri: str  # local path below Label Studio's LOCAL_FILES_DOCUMENT_ROOT, or s3://bucket/key
    category: str
    path: str | None = None  # relative to the pool's root: kept in the task's meta, out of the annotator's view


def _digest(prediction: dict, model_version: str) -> str:
    """What a prediction says, for "has it changed?": its regions, its score to 4 places, its version."""
    body = json.dumps([prediction["result"], round(float(prediction["score"] or 0.0), 4), model_version],
                      sort_keys=True, default=str)
    return hashlib.sha1(body.encode()).hexdigest()


def _studio(url: str, token: str):
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=url, api_key=token)


class LabelingProject:
    def __init__(self, url: str, token: str, project_id: int):
        self.url, self.token, self.id = url, token, project_id
        self.ls = _studio(url, token)
        self._predictions: dict[int, str] | None = None  # task -> digest of its one prediction
        self._data: dict[int, dict] | None = None  # task -> its data, as Label Studio holds it
        self.config = LabelConfig.parse(self.ls.projects.get(id=project_id).label_config)

    @classmethod
    def create(cls, url: str, token: str, title: str, pool: Sequence[PoolImage], defects: Sequence[str] = ("defect",),
               document_root: str | Path | None = None, s3_endpoint: str | None = None,
               policy: str = "top") -> LabelingProject:
        """Create the project, its storage, its tasks and its tabs (open tasks in ``policy``'s order, reviewed)."""
        if not pool:
            raise ValueError("the pool is empty: no images to label")
        ls = _studio(url, token)
        project = ls.projects.create(title=title, label_config=build_label_config(list(defects)),
                                     description="defectloop: the most anomalous images first")
        if pool[0].uri.startswith("s3://"):
            bucket, _, key = pool[0].uri[5:].partition("/")
            prefix = key.rsplit("/", 1)[0] if "/" in key else ""
            ls.import_storage.s3.create(
                project=project.id, bucket=bucket, prefix=prefix, use_blob_urls=True, presign=True,
                s3endpoint=s3_endpoint or os.environ.get("AWS_ENDPOINT_URL"), title="defectloop pool",
                region_name=os.environ.get("AWS_REGION", "us-east-1"),
                aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID"),
                aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY"))
            tasks = [{"image": img.uri, "category": img.category, "source": img.uri} for img in pool]
            metas = [img.path for img in pool]
        else:
            if document_root is None:
                raise ValueError("local images need Label Studio's LOCAL_FILES_DOCUMENT_ROOT (document_root)")
            root = Path(document_root).resolve()
            paths = [Path(img.uri).resolve() for img in pool]
            outside = [p for p in paths if not p.is_relative_to(root)]
            if outside:
                raise ValueError(f"{outside[0]} is not below Label Studio's document root {root}")
            folder = Path(os.path.commonpath([str(p.parent) for p in paths]))
            if folder == root:
                raise ValueError(f"the pool's folder {folder} is Label Studio's document root itself; it must be "
                                 "a subfolder of it (Label Studio refuses the root for security)")
            ls.import_storage.local.create(project=project.id, path=str(folder), title="defectloop pool",
                                           use_blob_urls=True)
            tasks = [{"image": f"/data/local-files/?d={quote(str(p.relative_to(root)))}", "category": img.category,
                      "source": str(p)} for p, img in zip(paths, pool, strict=True)]
            metas = [img.path for img in pool]
        items = [{"data": t, "meta": {"path": m}} if m else t for t, m in zip(tasks, metas, strict=True)]
        for i in range(0, len(items), 1000):
            ls.projects.import_tasks(id=project.id, request=items[i:i + 1000])
        for tab in tabs(policy):
            ls.views.create(project=project.id, data=tab)
        log.info("created Label Studio project %d with %d tasks", project.id, len(tasks))
        return cls(url, token, project.id)

    def queue(self, n: int) -> list[int]:
        """The first ``n`` tasks of the open tasks' tab: what an annotator sees at the top."""
        views = list(self.ls.views.list(project=self.id))
        if not views:
            raise LookupError(f"project {self.id} has no Data Manager tab")
        # a project made before the open tab existed: its first tab ("Most anomalous first")
        tab = next((v for v in views if v.data.get("title", "").startswith("Open:")), views[0])
        return [t.id for t in itertools.islice(self.ls.tasks.list(project=self.id, view=tab.id, fields="task_only"), n)]

    def tasks(self, ids: Sequence[int] | None = None) -> Iterator[dict]:
        """Every task (or those ``ids`` name that still exist) with its data and annotations (API form).

        Named tasks are read by the task list too, selected by id, never one by one: Label Studio
        answers a single-task read of a task without predictions by asking the project's ML backend
        (the scorer) for one, so reading a task just imported gave it the scorer's prediction beside
        the loop's (two per task, one flaky test)."""
        if ids is not None and not ids:
            return
        query = None if ids is None else json.dumps({"selectedItems": {"all": False, "included": list(ids)}})
        for t in self.ls.tasks.list(project=self.id, fields="all", resolve_uri=False, query=query):
            yield {"id": t.id, "data": dict(t.data), "annotations": [a if isinstance(a, dict) else a.dict()
                                                                       for a in (t.annotations or [])]}

    def push_predictions(self, predictions: Sequence[dict], model_version: str) -> int:
        """Make each task's one prediction ({task, result, score}) the given one, under ``model_version``,
        which becomes the project's; returns how many predictions were written.

        Unchanged predictions are not written again, changed ones are replaced, and a task's
        superseded predictions (older versions, duplicates) are deleted: annotators see one current
        prediction per task, and re-ranking after a bank update costs only what changed. A prediction's
        ``decision`` (normal/anomalous) goes into its task's data, where the Data Manager shows it as a
        column (it shows a prediction's result only as raw JSON); written only when it changes.
        """
        from label_studio_sdk import PredictionRequest

        current = self._current_predictions()
        new, digests, replaced = [], {}, []
        for p in predictions:
            digest = _digest(p, model_version)
            have = current.get(p["task"])
            if have == digest:
                continue
            if have is not None:
                replaced.append(p["task"])
            new.append(PredictionRequest(task=p["task"], result=p["result"], score=p["score"], model_version=model_version))
            digests[p["task"]] = digest
        if replaced:  # one request for all: an update in place per prediction cost one each (a normal
            # confirmed as evidence moves most of its category's scores)
            self.ls.actions.create(id="delete_tasks_predictions", project=self.id,
                                   selected_items={"all": False, "included": replaced})
        for i in range(0, len(new), 500):
            self.ls.projects.import_predictions(id=self.id, request=new[i:i + 500])
        # what they say is what was sent: not read back (reading every prediction of the project
        # after each push made an annotation cost the pool); the next reconcile reads them all
        current.update(digests)
        self._write_decisions({p["task"]: p["decision"] for p in predictions if "decision" in p})
        if self.model_version() != model_version:
            self.ls.projects.update(id=self.id, model_version=model_version)
        return len(new)

    def _write_decisions(self, decisions: dict[int, str]) -> None:
        """Task data ``decision`` where it differs (the data is replaced whole: the rest is kept)."""
        if self._data is None:
            self._data = {t.id: dict(t.data) for t in self.ls.tasks.list(project=self.id, fields="all", resolve_uri=False)}
        for task, decision in decisions.items():
            data = self._data.get(task)
            if data is not None and data.get("decision") != decision:
                data["decision"] = decision
                self.ls.tasks.update(id=task, data=data)

    def _current_predictions(self) -> dict[int, str]:
        """task -> digest of its one prediction; duplicates deleted (newest kept)."""
        if self._predictions is None:
            by_task: dict[int, list] = {}
            for pred in self.ls.predictions.list(project=self.id):
                by_task.setdefault(pred.task, []).append(pred)
            self._predictions = {}
            for task, preds in by_task.items():
                preds.sort(key=lambda x: x.id)
                for old in preds[:-1]:
                    self.ls.predictions.delete(id=old.id)
                keep = preds[-1]
                self._predictions[task] = _digest({"result": keep.result, "score": keep.score}, keep.model_version or "")
        return self._predictions

    def forget_predictions(self) -> None:
        """Re-read the project's predictions and task data at the next push (someone else may have written some)."""
        self._predictions = self._data = None

    def connect_scorer(self, scorer_url: str, token: str | None = None) -> int:
        """Connect the scorer as the project's ML backend (``<scorer>/ls``) and let its webhook in.

        Label Studio calls the backend with basic auth (the token as password), but the webhook it
        creates for the backend on its own (``<scorer>/ls/webhook``, every event) carries no
        credentials, so the scorer would answer 401 to every annotation event: the token goes into
        that webhook's headers here. Returns the ML backend's id.
        """
        url = scorer_url.rstrip("/") + "/ls"
        auth = {"auth_method": "BASIC_AUTH", "basic_auth_user": "labelstudio", "basic_auth_pass": token} if token else {}
        backend = self.ls.ml.create(project=self.id, url=url, title="defectloop scorer", **auth)
        if token:
            hook = f"{url}/webhook"
            headers = {"Authorization": f"Bearer {token}"}
            found = [w for w in self.ls.webhooks.list(project=str(self.id)) if w.url == hook]
            for w in found:
                self.ls.webhooks.update(id=w.id, url=hook, headers=headers)
            if not found:  # a Label Studio that does not create it: make our own
                self.ls.webhooks.create(project=self.id, url=hook, headers=headers, send_payload=True,
                                        send_for_all_actions=True)
        log.info("project %d: scorer %s connected as ML backend %s", self.id, url, backend.id)
        return backend.id

    def model_version(self) -> str | None:
        return self.ls.projects.get(id=self.id).model_version

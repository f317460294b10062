"""What ``defectloop label`` remembers between commands: one folder per labeling setup.

    <state>/workspace.json     Label Studio URL, project id, registry, pool, policy settings,
                               confirmed anomalies at the last retraining
    <state>/ledger.json        image-level labels (feedback.py)
    <state>/cursor.json        the sync's cursor (sync.py)
    <state>/pool_features.*    pool features, embedded once (predict.py)

Tokens are never written here: Label Studio's comes from LABEL_STUDIO_API_KEY (or --token), the
scorer's from DEFECTLOOP_API_TOKEN (or --scorer-token).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from defectloop.data.images import IMAGE_SUFFIXES
from defectloop.labeling.loop import LabelingLoop
from defectloop.labeling.policies import make_policy
from defectloop.labeling.project import LabelingProject, PoolImage
from defectloop.labeling.scorer import ScorerClient
from defectloop.registry import Registry
from defectloop.store import open_store


@dataclass
class Workspace:
    url: str
    project_id: int
    registry: str
    pool: str
    policy: str = "adaptive"
    batch: int = 20
    retrain_after: int = 20  # new confirmed masks that start a retraining (labeling/live.py)
    scorer: str | None = None  # the scorer service's URL, connected as the project's ML backend
    data: str | None = None  # training data (MVTec layout) a retraining fits on
    feature_cache: str | None = None  # a feature cache by image content (folder or s3://; `defectloop ingest`)

    @staticmethod
    def path(state: str | Path) -> Path:
        return Path(state) / "workspace.json"

    @classmethod
    def load(cls, state: str | Path) -> Workspace:
        p = cls.path(state)
        if not p.is_file():
            raise FileNotFoundError(f"{state} holds no labeling setup: run `defectloop label init` first")
        known = {f.name for f in fields(cls)}  # setups written by older versions carry keys since dropped
        return cls(**{k: v for k, v in json.loads(p.read_text()).items() if k in known})

    def save(self, state: str | Path) -> None:
        p = self.path(state)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, p)


def pool_images(pool: str) -> list[PoolImage]:
    """Images of a pool folder or s3:// prefix (paths or URIs); the category is the first folder below it."""
    store = open_store(pool)
    base = store.uri.rstrip("/")
    out = []
    for rel in store.keys(""):
        if rel.lower().endswith(IMAGE_SUFFIXES):
            out.append(PoolImage(f"{base}/{rel}", rel.split("/", 1)[0] if "/" in rel else "default"))
    return out


def init(state: str | Path, url: str, token: str, registry: str, pool: str, title: str, defects: list[str],
         document_root: str | None, policy: str, batch: int, retrain_after: int, scorer: str | None = None,
         scorer_token: str | None = None, feature_cache: str | None = None) -> LabelingLoop:
    images = pool_images(pool)
    project = LabelingProject.create(url, token, title, images, defects, document_root=document_root, policy=policy)
    if scorer:
        project.connect_scorer(scorer, scorer_token)
    ws = Workspace(url, project.id, registry, pool, policy, batch, retrain_after, scorer=scorer, feature_cache=feature_cache)
    ws.save(state)
    loop = open_loop(state, token, ws, scorer_token)
    loop.push()
    return loop


def open_loop(state: str | Path, token: str, ws: Workspace | None = None, scorer_token: str | None = None,
              scorer_wait_s: float = 120.0, watch_scorer: bool = True) -> LabelingLoop:
    """The loop of a labeling setup. ``watch_scorer``: after each publish, wait until the scorer
    serves it (the CLI's rounds); the live loop runs inside the scorer's application and does not."""
    ws = ws or Workspace.load(state)
    project = LabelingProject(ws.url, token, ws.project_id)
    scorer = ScorerClient(ws.scorer, scorer_token) if ws.scorer and watch_scorer else None
    return LabelingLoop(project, Registry(ws.registry), state, make_policy(ws.policy), ws.batch, cache_features=True,
                        scorer=scorer, scorer_wait_s=scorer_wait_s, feature_cache=ws.feature_cache)

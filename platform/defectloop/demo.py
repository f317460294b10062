"""The main job: the whole labeling loop on one machine, with a simulated annotator.

Generates a multi-category data set with synthetic defects (or reads ``--data`` in MVTec layout),
holds a test split back, makes a pool of the rest and half the normal training images at the given
defect rate (see ``split_pool``), trains an unsupervised DMAD model on the other normals, starts a
local Label Studio and the Ray Serve scorer (connected as the project's ML backend), imports the
pool and predicts. Then, per round: the selection policy picks
B tasks, a simulated annotator labels them through the Label Studio API exactly as a person's
annotations arrive (masks from ground truth), the sync turns them into abnormal-bank entries (a new
served label, hot-loaded by the scorer), the pool is re-predicted, and every few rounds the model is
retrained (warm, by the retraining job in a child process). The same runs with the random policy
for comparison. Prints a table per round and writes a learning curve (PNG) and, on request, the
rounds as JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np

from defectloop.data import Sample, load_mask, load_split
from defectloop.features import Extracted, extract
from defectloop.labeling.brush import BrushRLE
from defectloop.labeling.label_config import ANOMALOUS, NORMAL, LabelConfig
from defectloop.labeling.loop import LabelingLoop
from defectloop.labeling.policies import make_policy
from defectloop.labeling.project import LabelingProject, PoolImage
from defectloop.labeling.scorer import ScorerClient
from defectloop.labeling.server import label_studio
from defectloop.metrics import evaluate, fmt
from defectloop.models import AnomalyModel, DMADConfig, Fitter, ModelConfig, create_model
from defectloop.process import ManagedProcess, free_port
from defectloop.registry import Registry

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: Path
    data: Path | None = None
    rounds: int = 4
    batch: int = 10
    defect_rate: float = 0.1
    policy: str = "per-category"
    baseline: str = "random"
    retrain_every: int = 2
    test_fraction: float = 0.3
    pool_normals: float = 0.5  # share of the normal training images that join the unlabeled pool
    steps: int = 500
    seed: int = 0
    keep_running: bool = False
    # generated data (when no --data): images per category and their size
    n_train: int = 30
    n_test_good: int = 80
    n_test_bad: int = 12
    image_size: int = 256


def split_pool(data: Path, defect_rate: float, test_fraction: float, pool_normals: float,
               seed: int) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(training normals, pool, held-out test), per category.

    The test split (``test_fraction`` of the test images) is set aside before anything is shown.
    The pool is what annotators label: the other test images, with ``pool_normals`` of the normal
    training images (unlabeled production images are mostly normal), subsampled so that
    ``defect_rate`` of it is defective. The initial model trains on the training normals left.
    """
    split = load_split(data, seed=seed)
    rng = random.Random(f"{seed}/pool")
    train, pool, test = [], [], []
    for cat in split.categories:
        normals = [s for s in split.train if s.category == cat]
        good = [s for s in split.test if s.category == cat and s.label == 0]
        bad = [s for s in split.test if s.category == cat and s.label == 1]
        for x in (normals, good, bad):
            rng.shuffle(x)
        n_good, n_bad = round(len(good) * test_fraction), round(len(bad) * test_fraction)
        test += good[:n_good] + bad[:n_bad]
        n_normals = min(round(len(normals) * pool_normals), len(normals) - 2)  # two left: one to fit, one to calibrate
        train += normals[n_normals:]
        good, bad = good[n_good:] + normals[:n_normals], bad[n_bad:]
        keep_bad = min(len(bad), max(1, round(defect_rate * len(good) / (1 - defect_rate))))
        keep_good = min(len(good), round(keep_bad * (1 - defect_rate) / defect_rate))
        pool += good[:keep_good] + bad[:keep_bad]
    rng.shuffle(pool)
    return train, pool, test


def training_folder(train: list[Sample], folder: Path) -> Path:
    """The training normals as an MVTec-layout folder of links, for the retraining job: it trains on
    these and on what annotators confirmed, never on unlabeled pool images. Links keep each image's
    id (category/train/good/name), so a warm retraining knows which images its bank has seen."""
    shutil.rmtree(folder, ignore_errors=True)
    for s in train:
        link = folder / s.category / "train" / "good" / s.path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(s.path.resolve())
    return folder


def brush_result(mask: np.ndarray, label: str, config: LabelConfig) -> dict:
    h, w = mask.shape
    return {"type": "brushlabels", "from_name": config.brush, "to_name": config.image, "original_width": w,
            "original_height": h, "value": {"format": "rle", "rle": BrushRLE().encode(mask), "brushlabels": [label]}}


def annotate(project: LabelingProject, task_ids: list[int], truth: dict[int, Sample]) -> int:
    """The simulated annotator: labels tasks through the Label Studio API; returns the anomalies found."""
    config, found = project.config, 0
    for t in task_ids:
        s = truth[t]
        verdict = {"type": "choices", "from_name": config.choices, "to_name": config.image,
                   "value": {"choices": [ANOMALOUS if s.label else NORMAL]}}
        result = [verdict]
        if s.label and s.mask_path is not None and config.brush:
            result.append(brush_result(load_mask(s.mask_path), config.defect_label(s.defect), config))
        project.ls.annotations.create(id=t, result=result)
        found += s.label
    return found


def held_out_metrics(model: AnomalyModel, test: Extracted) -> dict:
    scores, maps = model.score_features(test.features)
    masks = [None if m is None else (m > 0.5).numpy() for m in test.masks]
    result = evaluate([s.category for s in test.samples], scores.numpy(), np.array([s.label for s in test.samples]),
                      maps.numpy(), masks)
    return result["mean"]


def retrain_job(registry: Path, data: Path) -> bool:
    """The retraining job in a child process, as a Ray job runs it: its memory returns to the system
    when it ends, and a failure (out of memory included) leaves the loop on the served version."""
    rc = subprocess.run([sys.executable, "-m", "defectloop.workers.retrain", "--registry", str(registry),
                         "--data", str(data)], check=False).returncode
    if rc:
        why = " (killed: out of memory?)" if rc == -signal.SIGKILL else ""
        print(f"  the retraining failed with exit status {rc}{why}; the loop keeps the served version", flush=True)
    return rc == 0


def run_demo(cfg: DemoConfig, json_out: str | None = None) -> dict:
    from defectloop.data.synthetic import make_dataset
    from defectloop.plots import learning_curve

    cfg.out.mkdir(parents=True, exist_ok=True)
    data = (cfg.data or make_dataset(cfg.out / "data", n_train=cfg.n_train, n_test_good=cfg.n_test_good,
                                     n_test_bad=cfg.n_test_bad, size=cfg.image_size, seed=cfg.seed)).resolve()
    train, pool, test = split_pool(data, cfg.defect_rate, cfg.test_fraction, cfg.pool_normals, cfg.seed)
    train_data = training_folder(train, cfg.out / "training-data")
    n_bad = sum(s.label for s in pool)
    print(f"data: {data}\npool: {len(pool)} images, {n_bad} defective ({n_bad / max(1, len(pool)):.0%}); "
          f"held-out test: {len(test)} images; training normals: {len(train)}", flush=True)

    model = create_model(ModelConfig(kind="dmad", seed=cfg.seed, image_size=cfg.image_size, dmad=DMADConfig(steps=cfg.steps)))
    Fitter(model).fit(extract(model.embedder, train, model.config.image_size, progress="training features"), progress=True)
    test_feats = extract(model.embedder, test, model.config.image_size, progress="test features")
    defects = sorted({s.defect for s in pool + test if s.label}) or ["defect"]

    ls = label_studio(cfg.out / "label-studio", data.parent)  # the pool's folder must be below the root, not it
    print("starting Label Studio (the first start migrates its database: about a minute)...", flush=True)
    ls.start().wait_ready("/health", 600)
    print(f"Label Studio: {ls.url}  login {ls.user} / {ls.password}", flush=True)
    scorer: ManagedProcess | None = None
    rounds: list[dict] = []
    try:
        for policy_name in dict.fromkeys([cfg.policy, cfg.baseline]):
            reg_root = cfg.out / f"registry-{policy_name}"
            shutil.rmtree(reg_root, ignore_errors=True)
            registry = Registry(reg_root)
            registry.register(model)
            project = LabelingProject.create(ls.url, ls.token, f"defectloop demo: {policy_name}",
                                             [PoolImage(str(s.path), s.category) for s in pool], defects, document_root=data.parent)
            if scorer is None:  # the scorer serves the main policy's registry, as the project's ML backend
                port = free_port()
                scorer = ManagedProcess("scorer", [sys.executable, "-m", "defectloop.cli", "serve", "--registry",
                                                   str(reg_root), "--port", str(port), "--no-auth"],
                                        {**os.environ, "DEFECTLOOP_POLL_S": "1"},
                                        f"http://127.0.0.1:{port}", cfg.out / "scorer.log")
                print("starting the Ray Serve scorer...", flush=True)
                scorer.start().wait_ready("/v1/health", 300)
                project.connect_scorer(scorer.url)
                print(f"scorer: {scorer.url}/docs (Label Studio ML backend: {scorer.url}/ls)", flush=True)
                client = ScorerClient(scorer.url)
            else:
                client = None  # the scorer serves the first policy's registry only
            loop = LabelingLoop(project, registry, cfg.out / f"state-{policy_name}", make_policy(policy_name, cfg.seed),
                                cfg.batch, scorer=client)
            by_uri = {f"/data/local-files/?d={quote(str(s.path.resolve().relative_to(data.parent)))}": s for s in pool}
            truth = {t["id"]: by_uri[t["data"]["image"]] for t in loop.tasks}
            m = held_out_metrics(loop.model, test_feats)
            rounds.append({"round": 0, "policy": policy_name, "shown": 0, "anomalies_found": 0,
                           "image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"], "model_version": loop.label})
            print(f"\n{policy_name}: round 0, {loop.label}: image AUROC {fmt(m['image_auroc'])}, "
                  f"pixel AUROC {fmt(m['pixel_auroc'])}", flush=True)
            print(f"{'round':>6s}{'shown':>7s}{'found':>7s}{'image AUROC':>13s}{'pixel AUROC':>13s}{'feedback s':>12s}  version")
            for r in range(1, cfg.rounds + 1):
                selected = loop.select()
                if not selected:
                    print("the pool is fully labeled")
                    break
                found = annotate(project, selected, truth)
                timing = loop.apply_feedback()
                served = timing.scorer
                if cfg.retrain_every and r % cfg.retrain_every == 0 and retrain_job(reg_root, train_data):
                    served = loop.reload()
                if served is not None and not served.ok:
                    print(f"  {served}", flush=True)
                m = held_out_metrics(loop.model, test_feats)
                rounds.append({"round": r, "policy": policy_name, "shown": len(selected), "anomalies_found": found,
                               "image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"],
                               "feedback_s": timing.seconds, "model_version": loop.label})
                print(f"{r:>6d}{len(selected):>7d}{found:>7d}{fmt(m['image_auroc']):>13s}{fmt(m['pixel_auroc']):>13s}"
                      f"{timing.seconds:>12.1f}  {loop.label}", flush=True)
        png = learning_curve(cfg.out / "learning_curve.png", rounds)
        print(f"\nlearning curve: {png}")
        if json_out:
            Path(json_out).write_text(json.dumps({"rounds": rounds}, indent=1))
        if cfg.keep_running:
            print(f"Label Studio ({ls.url}, {ls.user} / {ls.password}) and the scorer stay up; Ctrl-C to stop", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
    finally:
        if scorer is not None:
            scorer.stop()
        ls.stop(30)
    return {"rounds": rounds}



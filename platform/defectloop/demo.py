"""The main job: the labeling loop end to end on one machine, as a client of the stack.

Generates a multi-category data set with synthetic defects (or reads ``--data`` in MVTec layout),
holds a test split back, and lays the rest out as the stack's data folder: the training normals,
and a pool of test images and half the training normals at the given defect rate (see
``split_pool``). It trains the first model once, then, for the chosen policy and for random (the
baseline), starts the stack (``defectloop up``: local Ray, the scorer and the live loop) on one
shared Label Studio. Per round, a simulated annotator labels the first B open tasks of the ranked
tab through the Label Studio API, as a person's annotations arrive (masks from ground truth); the
live loop does the rest: bank, re-ranking, and every few rounds the retraining that the annotator
starts with Label Studio's "Start training". Each round is measured on the held-out split with the
model the scorer serves. Prints a table per round and writes a learning curve (PNG) and the rounds
as JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from defectloop.data import Sample, load_mask, load_split
from defectloop.evaluation import evaluate_extracted
from defectloop.features import Extracted, extract
from defectloop.labeling.brush import BrushRLE
from defectloop.labeling.label_config import ANOMALOUS, NORMAL, LabelConfig
from defectloop.labeling.project import LabelingProject
from defectloop.labeling.server import label_studio
from defectloop.metrics import fmt
from defectloop.models import AnomalyModel, DMADConfig, Fitter, ModelConfig, create_model, tiled
from defectloop.process import ManagedProcess
from defectloop.progress import bar as progress_bar
from defectloop.registry import TRAINED_BANK, Registry
from defectloop.stack import Stack, StackConfig

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: Path
    data: Path | None = None
    rounds: int = 3
    batch: int = 10
    defect_rate: float = 0.1
    policy: str = "adaptive"
    baseline: str = "random"
    retrain_every: int = 2
    test_fraction: float = 0.3
    pool_normals: float = 0.5  # share of the normal training images that join the unlabeled pool
    steps: int = 500
    seed: int = 0
    keep_running: bool = False
    parity: bool = False  # after each round, also a model fitted from scratch on the same labels
    image_level: tuple[str, ...] = ()  # categories the annotator labels without drawing masks
    # generated data (when no --data): images per category and their size
    n_train: int = 30
    n_test_good: int = 80
    n_test_bad: int = 12
    image_size: int = 256
    # generated defects' opacity (faint to plain) and the share of test images under new lighting
    # (normal glare the training images never show): round 0 is imperfect, and labels teach both
    strength: tuple[float, float] = (0.1, 0.7)
    drift: float = 0.5


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


def stack_folder(train: list[Sample], pool: list[Sample], folder: Path) -> dict[str, Sample]:
    """The stack's data folder, of links: ``<cat>/train/good`` the training normals, ``<cat>/test/...``
    the pool (with its masks under ``ground_truth``). Returns each pool image's path in it -> sample.

    The retraining trains on ``train/good`` and on what annotators confirmed, never on unlabeled
    pool images; links keep each training image's id (category/train/good/name), so a warm
    retraining knows which images its bank has seen."""
    shutil.rmtree(folder, ignore_errors=True)
    truth = {}
    for s in train:
        link = folder / s.category / "train" / "good" / s.path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(s.path.resolve())
    for s in pool:
        split = s.path.parts[-3]  # pool normals come from train/good and test/good: names may repeat
        rel = Path(s.category) / "test" / s.defect / f"{split}-{s.path.name}"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).symlink_to(s.path.resolve())
        if s.mask_path is not None:
            mask = folder / s.category / "ground_truth" / s.defect / f"{rel.stem}_mask.png"
            mask.parent.mkdir(parents=True, exist_ok=True)
            mask.symlink_to(s.mask_path.resolve())
        truth[rel.as_posix()] = s
    return truth


def brush_result(mask: np.ndarray, label: str, config: LabelConfig) -> dict:
    h, w = mask.shape
    return {"type": "brushlabels", "from_name": config.brush, "to_name": config.image, "original_width": w,
            "original_height": h, "value": {"format": "rle", "rle": BrushRLE().encode(mask), "brushlabels": [label]}}


def annotate(project: LabelingProject, task_ids: list[int], truth: dict[int, Sample],
             image_level: Collection[str] = ()) -> int:
    """The simulated annotator: labels tasks through the Label Studio API (a verdict, and the defect's
    mask where there is one, except in the ``image_level`` categories); returns the anomalies found."""
    config, found = project.config, 0
    for t in task_ids:
        s = truth[t]
        result = [{"type": "choices", "from_name": config.choices, "to_name": config.image,
                   "value": {"choices": [ANOMALOUS if s.label else NORMAL]}}]
        if s.label and s.mask_path is not None and config.brush and s.category not in image_level:
            result.append(brush_result(load_mask(s.mask_path), config.defect_label(s.defect), config))
        project.ls.annotations.create(id=t, result=result)
        found += s.label
    return found


def held_out_metrics(model: AnomalyModel, test: Extracted) -> dict:
    """Mean metrics on the held-out split, with the image AUROC per category (``per_category``)."""
    result = evaluate_extracted(model, test).result
    return {**result["mean"], "per_category": {c: m["image_auroc"] for c, m in sorted(result["categories"].items())}}


def batch_image_auroc(registry: Path, data: Path, test: Extracted) -> float:
    """Loop vs batch parity: the held-out image AUROC of a model fitted from scratch (the served
    version's settings) on what the loop has been taught so far: the training normals, the confirmed
    defects in the served bank and the images confirmed normal, none held back. The gap to the loop's
    model is what the loop loses of its labels."""
    from defectloop.workers.retrain import retrain

    with tempfile.TemporaryDirectory(prefix="defectloop-parity-") as tmp:
        copy = Path(tmp) / "registry"
        shutil.copytree(registry, copy, ignore=shutil.ignore_patterns("inbox", "runs"))
        retrain(str(copy), str(data), full=True, storage=str(Path(tmp) / "runs"))
        return held_out_metrics(Registry(copy).load(), test)["image_auroc"]


class StackClient:
    """What the demo asks of a running stack, over its HTTP API."""

    def __init__(self, info: dict):
        self.info = info
        self.http = httpx.Client(base_url=info["serve_url"], timeout=60,
                                 headers={"Authorization": f"Bearer {info['api_token']}"})

    def banks(self) -> dict:
        r = self.http.get("/v1/banks")
        r.raise_for_status()
        return r.json()

    @staticmethod
    def served(banks: dict) -> str:
        """The served model and bank as one label (the model version alone while its trained bank is served)."""
        return banks["model_version"] if banks["bank_version"] == TRAINED_BANK else f"{banks['model_version']}-{banks['bank_version']}"

    def wait_applied(self, labeled: int, timeout: float = 600) -> dict:
        """Until the loop has applied ``labeled`` tasks' labels and the scorer serves its bank."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            b = self.banks()
            loop = b.get("loop") or {}
            if loop.get("labeled_tasks", 0) >= labeled and b["pending_events"] == 0 and loop.get("bank_label") == self.served(b):
                return b
            time.sleep(0.2)
        raise TimeoutError(f"the live loop did not apply {labeled} labels within {timeout:.0f} s: {self.banks()}")

    def retrain(self, project: LabelingProject, timeout: float = 1800, expected_s: float = 60) -> dict:
        """Label Studio's "Start training" (its ML backend's /train), then wait for the retraining to be
        judged, with a bar (on a terminal) against ``expected_s``, what a retraining took before."""
        before = (self.banks().get("retraining") or {}).get("job")
        backend = next(iter(project.ls.ml.list(project=project.id)))
        project.ls.ml.train(id=backend.id)
        print(f"  retraining (a Ray job, about {expected_s:.0f} s)...", flush=True)
        start = time.monotonic()
        with progress_bar(total=round(expected_s), unit="s", desc="retraining") as bar:
            while time.monotonic() - start < timeout:
                bar.update(round(time.monotonic() - start) - bar.n)
                r = self.banks().get("retraining") or {}
                if r.get("job") not in (None, before) and r.get("state") in ("promoted", "kept", "failed"):
                    if r["state"] == "promoted":
                        wanted = r["candidate"]
                        while self.banks()["model_version"] != wanted and time.monotonic() - start < timeout:
                            time.sleep(0.2)
                    return {**r, "seconds": time.monotonic() - start}
                time.sleep(1.0)
        raise TimeoutError(f"the retraining was not judged within {timeout:.0f} s: {self.banks().get('retraining')}")


def queue_audit(project: LabelingProject, truth: dict[int, Sample], client: StackClient, timeout: float = 300) -> dict:
    """What annotators face at the end: predictions per task, and per category the open (unlabeled)
    normal images that the served model pre-annotates "anomalous" (false alarms in the queue), and
    the open defective ones it does (what a threshold raised over false alarms must not lose).

    Waits until the project's predictions are the served version's (the loop pushes them after a
    promotion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = client.banks()
        if project.model_version() == b["model_version"] and b["pending_events"] == 0:
            break
        time.sleep(0.5)
    else:
        log.warning("the project's predictions are not yet the served version's after %.0f s", timeout)
    per_task: dict[int, int] = {}
    for p in project.ls.predictions.list(project=project.id):
        per_task[p.task] = per_task.get(p.task, 0) + 1
    flagged: tuple[dict[str, dict], dict[str, dict]] = ({}, {})  # open normal images, open defective ones
    for t in project.tasks():
        s = truth[t["id"]]
        if not t["annotations"]:
            c = flagged[s.label].setdefault(s.category, {"flagged": 0, "open": 0})
            c["open"] += 1
            c["flagged"] += t["data"].get("decision") == "anomalous"
    for c in (*flagged[0].values(), *flagged[1].values()):
        c["share"] = c["flagged"] / max(1, c["open"])
    return {"max_predictions_per_task": max(per_task.values(), default=0),
            "tasks_without_prediction": len(truth) - len(per_task), "open_normals_flagged": dict(sorted(flagged[0].items())),
            "open_defects_flagged": dict(sorted(flagged[1].items()))}


def run_policy(cfg: DemoConfig, policy: str, stack_data: Path, truth_by_path: dict[str, Sample], model_dir: Path,
               studio: ManagedProcess, test_feats: Extracted, keep: bool) -> tuple[list[dict], Stack]:
    """One policy's rounds on a stack of its own (its registry seeded with the first model), on the
    running Label Studio ``studio`` (its pool's files are below the studio's document root)."""
    state = cfg.out / f"stack-{policy}"
    shutil.rmtree(state, ignore_errors=True)
    shutil.copytree(model_dir, state / "registry")
    stack = Stack(StackConfig(state=state, data=stack_data, policy=policy, batch=cfg.batch, retrain_after=0,
                              reconcile_s=60.0, label_studio_url=studio.url, label_studio_token=studio.token,
                              title=f"defectloop demo: {policy}", document_root=studio.root))
    rounds: list[dict] = []
    try:
        info = stack.up()
        client = StackClient(info)
        project = LabelingProject(studio.url, studio.token, info["project_id"])
        truth = {t.id: truth_by_path[t.meta["path"]] for t in project.ls.tasks.list(project=project.id, fields="all")}
        registry = Registry(state / "registry")
        m = held_out_metrics(registry.load(), test_feats)
        label = registry.label()
        rounds.append({"round": 0, "policy": policy, "shown": 0, "anomalies_found": 0, "image_auroc": m["image_auroc"],
                       "pixel_auroc": m["pixel_auroc"], "per_category": m["per_category"], "model_version": label,
                       # no labels yet: the batch model is the first model
                       **({"batch_image_auroc": m["image_auroc"]} if cfg.parity else {})})
        print(f"\n{policy}: round 0, {label}: image AUROC {fmt(m['image_auroc'])}, pixel AUROC {fmt(m['pixel_auroc'])}",
              flush=True)
        print(f"{'round':>6s}{'shown':>7s}{'found':>7s}{'image AUROC':>13s}{'pixel AUROC':>13s}{'feedback s':>12s}  version")
        labeled: set[int] = set()
        retrain_s = 60.0  # a guess until the first retraining is timed
        for r in range(1, cfg.rounds + 1):
            shown = project.queue(cfg.batch)
            if not shown:
                print("the pool is fully labeled")
                break
            t0 = time.perf_counter()
            found = annotate(project, shown, truth, cfg.image_level)
            labeled.update(shown)
            client.wait_applied(len(labeled))
            feedback_s = time.perf_counter() - t0
            outcome = None
            if cfg.retrain_every and r % cfg.retrain_every == 0:
                outcome = client.retrain(project, expected_s=retrain_s)
                retrain_s = outcome["seconds"]
                print(f"  retraining: {outcome['state']} after {retrain_s:.0f} s: {outcome['reason']}", flush=True)
            m = held_out_metrics(registry.load(), test_feats)
            label = registry.label()
            parity = {"batch_image_auroc": batch_image_auroc(state / "registry", stack_data, test_feats)} if cfg.parity else {}
            rounds.append({"round": r, "policy": policy, "shown": len(shown), "anomalies_found": found,
                           "image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"], "per_category": m["per_category"],
                           **parity, "feedback_s": feedback_s, "model_version": label,
                           **({"retraining": outcome} if outcome else {})})
            print(f"{r:>6d}{len(shown):>7d}{found:>7d}{fmt(m['image_auroc']):>13s}{fmt(m['pixel_auroc']):>13s}"
                  f"{feedback_s:>12.1f}  {label}"
                  + (f"  (from scratch on the same labels: {fmt(parity['batch_image_auroc'])})" if parity else ""), flush=True)
        rounds[-1]["queue"] = queue_audit(project, truth, client)
        q = rounds[-1]["queue"]
        print(f"  queue: {q['max_predictions_per_task']} prediction(s) per task at most; open normal images called "
              "anomalous: " + ", ".join(f"{c} {v['flagged']}/{v['open']}" for c, v in q["open_normals_flagged"].items())
              + "; open defective images: " + ", ".join(f"{c} {v['flagged']}/{v['open']}"
                                                       for c, v in q["open_defects_flagged"].items()), flush=True)
    finally:
        if not keep:
            stack.down()
    return rounds, stack


def run_demo(cfg: DemoConfig, json_out: str | None = None, studio: ManagedProcess | None = None) -> dict:
    """The demo; ``studio``: a running Label Studio (from ``labeling.server.label_studio``) whose
    document root holds ``cfg.out``, used instead of starting one (the tests share theirs)."""
    from defectloop.data.synthetic import make_dataset
    from defectloop.plots import learning_curve

    cfg.out = cfg.out.resolve()
    cfg.out.mkdir(parents=True, exist_ok=True)
    data = (cfg.data or make_dataset(cfg.out / "data", n_train=cfg.n_train, n_test_good=cfg.n_test_good,
                                     n_test_bad=cfg.n_test_bad, size=cfg.image_size, seed=cfg.seed,
                                     strength=cfg.strength, drift=cfg.drift)).resolve()
    train, pool, test = split_pool(data, cfg.defect_rate, cfg.test_fraction, cfg.pool_normals, cfg.seed)
    stack_data = cfg.out / "stack-data"
    truth_by_path = stack_folder(train, pool, stack_data)
    n_bad = sum(s.label for s in pool)
    print(f"data: {data}\npool: {len(pool)} images, {n_bad} defective ({n_bad / max(1, len(pool)):.0%}); "
          f"held-out test: {len(test)} images; training normals: {len(train)}", flush=True)

    model = create_model(ModelConfig(kind="dmad", seed=cfg.seed, image_size=cfg.image_size, dmad=DMADConfig(steps=cfg.steps, warm_steps=max(20, cfg.steps // 5))))
    Fitter(model).fit_samples(train, progress=True)
    model_dir = cfg.out / "first-model"
    shutil.rmtree(model_dir, ignore_errors=True)
    Registry(model_dir).register(model)
    test_feats = extract(model.embedder, tiled(test, model.config), model.config.image_size, progress="test features")

    ls = studio or label_studio(cfg.out / "label-studio", cfg.out)  # the stacks' pools are below cfg.out
    if studio is None:
        print("starting Label Studio (the first start migrates its database: about a minute)...", flush=True)
        ls.start().wait_ready("/health", 600)
    print(f"Label Studio: {ls.url}  login {ls.user} / {ls.password}", flush=True)
    rounds: list[dict] = []
    last: Stack | None = None
    try:
        policies = list(dict.fromkeys([cfg.policy, cfg.baseline]))
        for i, policy in enumerate(policies):
            keep = cfg.keep_running and i == len(policies) - 1
            done, last = run_policy(cfg, policy, stack_data, truth_by_path, model_dir, ls, test_feats, keep)
            rounds += done
        learning_curve(cfg.out / "learning_curve.png", rounds)
        report = json.dumps({"rounds": rounds}, indent=1)
        (cfg.out / "report.json").write_text(report)
        if json_out:
            Path(json_out).write_text(report)
        if cfg.keep_running and last is not None:
            print(f"Label Studio ({ls.url}, {ls.user} / {ls.password}) and the {cfg.baseline} stack stay up "
                  f"({last.info.get('serve_url')}); Ctrl-C to stop", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
    finally:
        if cfg.keep_running and last is not None:
            last.down()
        if studio is None:
            ls.stop(30)
    return {"rounds": rounds}

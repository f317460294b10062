"""Ray Train on local Ray: sharded fits, the distributed coreset, recovery from a killed worker,
and the retraining job submitted to a Ray head through the Jobs API."""

import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
import ray
import torch

from defectloop.cli import main
from defectloop.data import load_split
from defectloop.memory.coreset import coverage_radius
from defectloop.metrics import auroc
from defectloop.models import CRADConfig, DMADConfig, ModelConfig
from defectloop.models.holdout import split_holdout
from defectloop.registry import Registry
from defectloop.workers.train import fit_distributed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray(ray_head):
    """This session's Ray head, by its address: never another Ray that runs on the machine."""
    ray.init(address=ray_head.address, logging_level="WARNING")
    yield ray_head
    ray.shutdown()


def config(steps: int = 120, **kw) -> ModelConfig:
    return ModelConfig(**{**dict(kind="dmad", image_size=128, coreset_ratio=0.1), **kw},
                       dmad=DMADConfig(steps=steps, batch_size=512, synthetic_per_category=2, train_patches=20_000))


def image_auroc(model, test) -> float:
    scores, _ = model.score_features(test.features)
    return auroc(scores.numpy(), np.array([s.label for s in test.samples]))


def test_one_and_two_workers_give_equivalent_models(local_ray, tiny_data, tiny_features, confirmed_defects, tmp_path):
    train, test = tiny_features(2)
    split = load_split(tiny_data, anomalies_per_class=2)
    confirmed = confirmed_defects(test, config().dmad.mask_coverage)  # annotators' defects, as in a retraining
    m1, s1 = fit_distributed(config(), split.train, 1, storage=str(tmp_path / "runs"), confirmed=confirmed)
    m2, s2 = fit_distributed(config(), split.train, 2, storage=str(tmp_path / "runs"), confirmed=confirmed)
    assert s1["real_abnormal_patches"] == s2["real_abnormal_patches"] > sum(len(c) for _, c in confirmed)
    assert all(p.annotation_id in m2.abnormal_bank for p, _ in confirmed)
    assert abs(image_auroc(m1, test) - image_auroc(m2, test)) <= 0.01
    assert image_auroc(m2, test) > 0.9
    # training patches: those of images both runs fitted on (each held back its own calibration images)
    held = set(split_holdout(train.samples, 0.1, 0)[1])
    for rank in range(2):
        shard = list(range(len(train.samples)))[rank::2]
        held |= {shard[i] for i in split_holdout([train.samples[j] for j in shard], 0.1, 0)[1]}
    fit = [i for i, s in enumerate(train.samples) if s.label == 0 and i not in held]
    patches = train.features[fit].permute(0, 2, 3, 1).reshape(-1, train.features.shape[1])
    r1 = coverage_radius(patches, m1.normal_bank.features)
    r2 = coverage_radius(patches, m2.normal_bank.features)
    print("coverage radius", r1, r2)
    assert abs(r2 - r1) / r1 <= 0.10, (r1, r2)
    # each shard holds back its own calibration images (at least one per category), so the fitted
    # patch counts, and with them the bank sizes, differ a little
    assert abs(len(m2.normal_bank) - len(m1.normal_bank)) <= 0.1 * len(m1.normal_bank)
    assert [w["n_images"] for w in s2["per_worker"]] == [27, 27] and s2["workers"] == 2
    assert len(m2.abnormal_bank.annotations) >= 6  # the annotated masks of both shards, on every worker


def test_two_worker_crad_clusters_the_union_of_shards(local_ray, tiny_data, tmp_path):
    """Every worker computes the feature statistics from all shards' images, so they agree with one worker's."""
    split = load_split(tiny_data, anomalies_per_class=2)
    cfg = ModelConfig(kind="crad", image_size=128, crad=CRADConfig(epochs=6, batch_size=8))
    m1, s1 = fit_distributed(cfg, split.train, 1, storage=str(tmp_path / "runs"))
    m2, s2 = fit_distributed(cfg, split.train, 2, storage=str(tmp_path / "runs"))
    assert s2["workers"] == 2 and s2["crad_clusters"] == s1["crad_clusters"]
    # per-shard hold-backs make the union a little smaller; one shard alone would be about half
    assert abs(s2["crad_stats_images"] - s1["crad_stats_images"]) <= 0.2 * s1["crad_stats_images"]
    a, b = m1.head.stats, m2.head.stats
    # clusters match up to their order; shards hold back different calibration images, so the
    # moments differ a little
    gap = (a.mean[:, None] - b.mean[None]).abs().amax(2)  # K x K, largest channel difference
    match = gap.argmin(1)
    assert sorted(match.tolist()) == list(range(len(match)))
    assert (gap.min(1).values <= 0.25 * a.std.amax(1)).all(), gap


def ray_worker_pids(dashboard: str) -> list[int]:
    """PIDs of this cluster's live Ray Train workers (by the state API: not another Ray's on the machine)."""
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return sorted(a.pid for a in actors)


def test_killed_worker_is_replaced_and_resumes_from_checkpoint(local_ray, tiny_data, tiny_features, tmp_path):
    _, test = tiny_features(2)
    split = load_split(tiny_data, anomalies_per_class=2)
    runs = tmp_path / "runs"
    box: dict = {}

    def run():
        try:
            box["result"] = fit_distributed(config(steps=800), split.train, 2, storage=str(runs), name="kill-test")
        except Exception as e:  # reported by the assertion below
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 300
    while not list(runs.glob("kill-test/checkpoint_*")):  # the bank phase is checkpointed
        assert t.is_alive(), f"the run ended before its first checkpoint: {box}"
        assert time.monotonic() < deadline, "no checkpoint of the bank phase within 300 s"
        time.sleep(0.2)
    time.sleep(3)  # let the controller register the checkpoint; the workers are training the scorer now
    pids = ray_worker_pids(local_ray.url)
    assert len(pids) == 2, f"expected 2 live Ray Train workers, found {pids}"
    os.kill(pids[-1], signal.SIGKILL)
    t.join(600)
    assert not t.is_alive(), "the run did not finish within 600 s of the worker's kill"
    assert "error" not in box, box.get("error")
    model, stats = box["result"]
    assert stats["resumed_after"] == ["bank"]  # the new workers skipped the coreset
    assert image_auroc(model, test) > 0.9


def test_failed_run_leaves_the_registry_untouched(local_ray, tiny_data, served_registry, tmp_path):
    import shutil

    root = tmp_path / "reg"
    shutil.copytree(served_registry, root)
    code = main(["train", "--data", str(tiny_data), "--model", "dmad", "--workers", "2", "--max-failures", "0",
                 "--backbone-checkpoint", str(tmp_path / "missing.pth"), "--backbone", "resnet18",
                 "--registry", str(root)])
    assert code == 2
    assert Registry(root).ids() == ["v0001"] and Registry(root).current() == "v0001"


def test_retrain_job_on_a_ray_head(ray_head, tiny_data, served_registry, tmp_path, capsys):
    import shutil

    url = ray_head.url
    root = tmp_path / "reg"
    shutil.copytree(served_registry, root)
    assert main(["retrain", "--submit", "--address", url, "--python", sys.executable,
                 "--registry", str(root), "--data", str(tiny_data), "--workers", "2"]) == 0
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    deadline = time.monotonic() + 300
    while True:
        main(["jobs", "status", job_id, "--address", url])
        line = capsys.readouterr().out
        if any(s in line for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        assert time.monotonic() < deadline, line
        time.sleep(2)
    assert main(["jobs", "logs", job_id, "--address", url]) == 0
    logs = capsys.readouterr().out
    assert "SUCCEEDED" in line, logs[-3000:]
    assert "registered v0002" in logs
    reg = Registry(root)
    fit = reg.info()["fit"]
    assert reg.current() == "v0002" and fit["retrained_from"] == "v0001"
    # a warm fit on 2 Ray Train workers: each loaded the served version, and its bank entries all stay
    assert fit["warm"] and fit["workers"] == 2
    old, new = reg.load("v0001").normal_bank, reg.load("v0002").normal_bank
    assert torch.equal(new.features[:len(old)], old.features) and len(new) == len(old) + fit["normal_bank_added"]


def test_checkpoints_land_in_s3(local_ray, s3, tiny_data):
    """Ray Train's storage on S3 (pyarrow filesystem with the endpoint override): checkpoints in the bucket."""
    import uuid

    from defectloop.store import open_store

    prefix = f"runs-{uuid.uuid4().hex[:8]}"
    split = load_split(tiny_data)
    model, stats = fit_distributed(config(kind="patchcore"), split.train, 1, storage=f"s3://{s3.bucket}/{prefix}",
                                   name="s3-run")
    keys = open_store(f"s3://{s3.bucket}/{prefix}").keys("s3-run")
    assert any(k.endswith("/config.json") and "/checkpoint_" in k for k in keys), keys[:10]
    assert model.fitted and stats["normal_bank_size"] == len(model.normal_bank)

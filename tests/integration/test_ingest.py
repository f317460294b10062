"""Pool ingestion on Ray Data (``defectloop ingest``) against the session's Ray head: killed halfway
and started again, every image is embedded exactly once, and the cached features are the
backbone's, as a fresh run and the in-process embedder give them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from defectloop.data import load_image
from defectloop.data.synthetic import make_dataset
from defectloop.data.tiles import WHOLE, Grid
from defectloop.features import PatchEmbedder, image_tensor, load_backbone
from defectloop.features.cache import FeatureCache, content_hash
from defectloop.models import ModelConfig
from defectloop.process import driver_env
from defectloop.store import LocalStore

pytestmark = pytest.mark.slow

SIZE = 128


def ingest_command(pool: Path, cache: Path, address: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "defectloop.cli", "ingest", "--pool", str(pool), "--cache", str(cache),
            "--ray-address", address, "--image-size", str(SIZE), "--batch-size", "2", "--concurrency", "1",
            "--json", str(out)]


def cached(cache: Path) -> set[str]:
    """Digests the cache holds (complete entries only: a write in progress has a hidden name)."""
    return {p.stem for p in cache.rglob("*.safetensors") if not p.name.startswith(".")}


def wait_for(what: str, ok, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the ingestion exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.05)


def test_ingestion_killed_halfway_embeds_each_image_once(ray_head, tmp_path):
    pool = make_dataset(tmp_path / "pool", n_train=40, n_test_good=5, n_test_bad=5, size=SIZE, seed=3)
    sources = sorted(p for p in pool.rglob("*.png") if "ground_truth" not in p.parts)
    digests = {content_hash(p.read_bytes()) for p in sources}
    assert len(digests) == len(sources)
    pool_images = tmp_path / "images"  # the pool without its masks: every file is an image to embed
    for p in sources:
        dst = pool_images / p.relative_to(pool)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(p.read_bytes())
    cache = tmp_path / "cache"
    env = driver_env(ray_head)

    first = subprocess.Popen(ingest_command(pool_images, cache, ray_head.address, tmp_path / "first.json"), env=env,
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for("the first 10 cached features", lambda: len(cached(cache)) >= 10, 180, first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    # the killed driver's actors stop: the cache stops growing
    last = {"n": -1, "since": time.monotonic()}

    def settled() -> bool:
        n = len(cached(cache))
        if n != last["n"]:
            last.update(n=n, since=time.monotonic())
        return time.monotonic() - last["since"] > 3.0

    wait_for("the killed ingestion's actors to stop writing", settled, 60)
    before = cached(cache)
    assert 10 <= len(before) < len(digests), "the ingestion was not killed halfway"

    out = tmp_path / "second.json"
    second = subprocess.run(ingest_command(pool_images, cache, ray_head.address, out), env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    rows = json.loads(out.read_text())
    embedded = {r["digest"] for r in rows if r["embedded"]}
    assert len(rows) == len(sources) and not any(r["error"] for r in rows)
    assert not embedded & before  # nothing embedded twice
    assert embedded | before == digests == cached(cache)  # every image once
    assert all(r["node"] for r in rows if r["embedded"])
    assert {tuple(r["size"]) for r in rows} == {(SIZE, SIZE)}

    # the features: a fresh run's, and the backbone's in this process (float16)
    fresh = tmp_path / "fresh"
    again = subprocess.run(ingest_command(pool_images, fresh, ray_head.address, tmp_path / "fresh.json"), env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    config = ModelConfig(image_size=SIZE)
    resumed = FeatureCache(LocalStore(cache), config.backbone, None, SIZE)
    fresh_cache = FeatureCache(LocalStore(fresh), config.backbone, None, SIZE)
    embedder = PatchEmbedder(load_backbone(config.backbone))
    for p in sources[::15]:
        digest = content_hash(p.read_bytes())
        a, b = resumed.get(digest).features.float(), fresh_cache.get(digest).features.float()
        with torch.no_grad():
            ref = embedder(image_tensor(load_image(p), SIZE)[None])[0].float()
        scale = float(ref.abs().max())
        assert torch.allclose(a, b, atol=1e-2 * scale) and torch.allclose(a, ref, atol=1e-2 * scale)


def test_ingestion_embeds_as_the_registry_s_version_sees_images(ray_head, tmp_path):
    """``--registry``: the backbone, input size and tiles come from the version, not the flags, so
    a category the version sees as 2 x 2 tiles is cached as those tiles (and the other whole)."""
    pool = make_dataset(tmp_path / "pool", n_train=3, n_test_good=0, n_test_bad=0, size=SIZE, seed=5,
                        categories=("tile", "disc"))
    version = tmp_path / "version"
    version.mkdir()
    config = ModelConfig(image_size=64, tile_overlap=32, tiles={"tile": 2})
    (version / "config.json").write_text(json.dumps(config.to_dict()))
    out, cache = tmp_path / "rows.json", tmp_path / "cache"
    cmd = [*ingest_command(pool, cache, ray_head.address, out), "--registry", str(version)]
    run = subprocess.run(cmd, env=driver_env(ray_head), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 6 and all(r["embedded"] for r in rows)
    features = FeatureCache(LocalStore(cache), config.backbone, None, 64)
    for r in rows:
        tiled = "/tile/" in r["source"]
        got = features.get(r["digest"], Grid(2, 2) if tiled else WHOLE).features
        assert got.shape == ((4, 152, 8, 8) if tiled else (152, 8, 8)), (r["source"], got.shape)


def test_ingestion_spreads_over_two_nodes(tmp_path_factory):
    """Two one-CPU Ray nodes on this machine (``ray start --head`` and ``ray start --address``): the
    ingestion's two backbone actors run one on each, and both embed."""
    from defectloop.process import alive_nodes, ray_head, ray_worker

    temp = tmp_path_factory.mktemp("ray2")
    head = ray_head(temp / "h", num_cpus=1).start().wait_ready("/api/version", 120)
    worker = ray_worker(head.address, temp / "worker.log", num_cpus=1).start()
    try:
        wait_for("the second node to join the cluster", lambda: alive_nodes(head) == 2, 120)
        # enough work that the actor which starts second still finds some (an actor takes 5-10 s to start)
        pool = make_dataset(temp / "pool", n_train=80, n_test_good=0, n_test_bad=0, size=256, seed=4)
        out = temp / "rows.json"
        cmd = ingest_command(pool, temp / "cache", head.address, out)
        cmd[cmd.index("--concurrency") + 1] = "2"
        cmd[cmd.index("--image-size") + 1] = "256"
        run = subprocess.run(cmd, env=driver_env(head), capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        rows = json.loads(out.read_text())
        assert rows and all(r["embedded"] for r in rows)
        nodes = {r["node"] for r in rows}
        assert len(nodes) == 2, f"all {len(rows)} images embedded on {nodes}"
    finally:
        worker.stop(30)
        head.stop(30)

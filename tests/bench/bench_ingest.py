"""Pool ingestion through Ray Data against the bare backbone in this process, on the same cores.

    python tests/bench/bench_ingest.py [--images N] [--size PX] [--data DIR] [--nodes]

Prints, measured in one run: images/s of the bare backbone (read, decode, embed; batches of 16,
``--batch-size``; every core's threads), of ``defectloop ingest``'s pipeline (Ray Data, one backbone actor per
core), their ratio, with the actors' start and at the steady rate (the whole pool less a start run
of two batches per actor: what a large pool sees); the cache's disk per image; and what float16 costs
the scores: nearest-neighbour image scores of 64 pool images against a bank of 64 others, from
float32 and from the cached float16 features. ``--nodes``: the pipeline on two one-CPU Ray nodes
of this machine (``ray start --head`` and ``ray start --address``) against one, the same two ways.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from defectloop.data import read_image
from defectloop.data.synthetic import make_dataset
from defectloop.features import PatchEmbedder, image_tensor, load_backbone
from defectloop.features.cache import FeatureCache, content_hash
from defectloop.models import ModelConfig
from defectloop.workers.ingest import ingest, pool_sources


def bare(sources: list[str], size: int, embedder: PatchEmbedder, batch_size: int) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    feats, batch = [], []
    with torch.no_grad():
        for s in sources:
            img, _ = read_image(Path(s).read_bytes(), size)
            batch.append(image_tensor(img, size))
            if len(batch) == batch_size:
                feats.append(embedder(torch.stack(batch)).float())
                batch = []
        if batch:
            feats.append(embedder(torch.stack(batch)).float())
    return len(sources) / (time.perf_counter() - t0), torch.cat(feats)


def image_scores(bank: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """PatchCore's image score: the largest patch distance to the nearest bank patch."""
    b = bank.permute(0, 2, 3, 1).reshape(-1, bank.shape[1])
    out = []
    for q in queries:
        d = torch.cdist(q.flatten(1).T, b).min(1).values
        out.append(d.max())
    return torch.stack(out)


def on_nodes(n: int, pools: list[str], config: ModelConfig, tmp: str, batch_size: int) -> list[float]:
    """Seconds of ``defectloop ingest`` (its own driver process, driver and actor start included)
    for each pool in turn, each into an empty cache, on one cluster of ``n`` one-CPU nodes on this
    machine (``ray start --head`` and ``ray start --address``)."""
    import json
    import subprocess
    import sys

    from defectloop.process import alive_nodes, driver_env, ray_head, ray_worker

    head = ray_head(Path(tmp) / f"n{n}", num_cpus=1).start().wait_ready("/api/version", 120)
    workers = [ray_worker(head.address, Path(tmp) / f"n{n}-worker{i}.log", num_cpus=1).start() for i in range(n - 1)]
    try:
        deadline = time.monotonic() + 120
        while alive_nodes(head) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"waited 120 s for {n} Ray nodes")
            time.sleep(0.5)
        seconds = []
        for k, pool in enumerate(pools):
            out = Path(tmp) / f"rows{n}-{k}.json"
            t0 = time.perf_counter()
            run = subprocess.run([sys.executable, "-m", "defectloop.cli", "ingest", "--pool", pool,
                                  "--cache", str(Path(tmp) / f"c{n}-{k}"), "--ray-address", head.address,
                                  "--concurrency", str(n), "--batch-size", str(batch_size),
                                  "--image-size", str(config.image_size), "--json", str(out)],
                                 env=driver_env(head), capture_output=True, text=True)
            seconds.append(time.perf_counter() - t0)
            if run.returncode:
                raise RuntimeError(f"defectloop ingest on {n} node(s) failed:\n{run.stdout[-1000:]}\n{run.stderr[-3000:]}")
            rows = json.loads(out.read_text())
            assert len({r["node"] for r in rows if r["embedded"]}) == n, "not every node embedded"
        return seconds
    finally:
        for w in workers:
            w.stop(30)
        head.stop(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--data", help="a folder of images (default: generated)")
    ap.add_argument("--batch-size", type=int, default=16, help="images per batch, both ways")
    ap.add_argument("--nodes", action="store_true", help="also: two one-CPU Ray nodes against one")
    args = ap.parse_args()
    import ray

    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            sources = [s for s in pool_sources(args.data) if "ground_truth" not in s][: args.images]
        else:
            per_cat = max(1, args.images // 3)
            data = make_dataset(Path(tmp) / "data", n_train=per_cat - 10, n_test_good=5, n_test_bad=5, size=args.size)
            sources = [s for s in pool_sources(str(data)) if "ground_truth" not in s][: args.images]
        config = ModelConfig(image_size=args.size)
        torch.set_num_threads(cores)
        embedder = PatchEmbedder(load_backbone(config.backbone))
        bare(sources[:16], args.size, embedder, args.batch_size)  # warm-up
        bare_ips, f32 = bare(sources, args.size, embedder, args.batch_size)

        ray.init(num_cpus=cores, include_dashboard=False, logging_level="ERROR")
        cache = str(Path(tmp) / "cache")
        ingest(sources[:cores * 2], str(Path(tmp) / "warm"), config, concurrency=cores)  # Ray Data's own warm-up
        # a start run (two batches per actor) and the whole pool, each with actors of its own: the
        # difference is the steady rate, what a large pool sees once the actors have started
        start_n = 2 * cores * args.batch_size
        t0 = time.perf_counter()
        ingest(sources[:start_n], str(Path(tmp) / "start-cache"), config, concurrency=cores, batch_size=args.batch_size)
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows = ingest(sources, cache, config, concurrency=cores, batch_size=args.batch_size)
        ray_s = time.perf_counter() - t0
        steady = (len(sources) - start_n) / (ray_s - start_s)
        ray.shutdown()
        assert sum(r.embedded for r in rows) == len(sources)
        files = [p for p in Path(cache).rglob("*.safetensors")]
        disk = sum(p.stat().st_size for p in files) / len(files)
        store = FeatureCache.open(cache, config.backbone, None, args.size)
        f16 = torch.stack([store.get(content_hash(Path(s).read_bytes())).features.float() for s in sources])

        if args.nodes:
            # The whole pool, and a start pool (two batches per actor): the difference is the
            # steady rate, what a large pool sees once the driver and the actors have started.
            start_n = 2 * 2 * args.batch_size
            pools = []
            for name, chosen in (("start-pool", sources[:start_n]), ("pool", sources)):
                pools.append(str(Path(tmp) / name))
                Path(pools[-1]).mkdir()
                for i, src in enumerate(chosen):
                    (Path(pools[-1]) / f"{i:05d}{Path(src).suffix}").write_bytes(Path(src).read_bytes())
            rates = {}
            for nodes in (1, 2):
                t_start, t_pool = on_nodes(nodes, pools, config, tmp, args.batch_size)
                rates[nodes] = (len(sources) / t_pool, (len(sources) - start_n) / (t_pool - t_start), t_start)
            (one, one_steady, one_t0), (two, two_steady, two_t0) = rates[1], rates[2]
            print(f"defectloop ingest, {len(sources)} images, driver and actor start included: one 1-CPU node "
                  f"{one:.1f} img/s, two 1-CPU nodes {two:.1f} img/s: {two / one:.2f}x")
            print(f"  steady (less a {start_n}-image run: {one_t0:.1f} s on one node, {two_t0:.1f} s on two): "
                  f"one node {one_steady:.1f} img/s, two {two_steady:.1f} img/s: {two_steady / one_steady:.2f}x")

    n = min(64, len(sources) // 2)  # a bank of n images, n queries: enough to see the ranking move
    s32, s16 = image_scores(f32[:n], f32[n:2 * n]), image_scores(f16[:n], f16[n:2 * n])
    rank32, rank16 = s32.argsort().argsort().float(), s16.argsort().argsort().float()
    spearman = float(torch.corrcoef(torch.stack([rank32, rank16]))[0, 1])
    print(f"{len(sources)} images at {args.size} px, {cores} cores, backbone {config.backbone}")
    print(f"bare backbone in-process      {bare_ips:7.1f} img/s")
    print(f"Ray Data ingestion ({cores} actors) {len(sources) / ray_s:7.1f} img/s  "
          f"ratio {len(sources) / ray_s / bare_ips:.2f}x (actor start included)")
    print(f"  steady (less a {start_n}-image run of {start_s:.1f} s)  {steady:7.1f} img/s  ratio {steady / bare_ips:.2f}x")
    print(f"cache: {disk / 1024:.0f} KiB per image (float16 {tuple(f16.shape[1:])}); "
          f"{disk * 100_000 / 2**30:.1f} GiB per 100,000 images")
    print(f"float16 vs float32 image scores: max |diff| {float((s32 - s16).abs().max()) / float(s32.std()):.2e} "
          f"of their spread, Spearman {spearman:.5f}")
    print(f"features: max |f16 - f32| {float((f16 - f32).abs().max()):.2e} (feature scale {float(f32.abs().max()):.1f})")


if __name__ == "__main__":
    main()

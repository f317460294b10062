"""Load test of the scorer over HTTP (run on demand, not in CI).

    .venv/bin/python tests/bench/bench_serve.py [--registry DIR] [--requests 500] [--clients 16]

Without --registry it trains a DMAD model (product defaults, 256 px) on the first images of each
category of ../shared/data/dev (a category whose images are larger than the model's input may be
seen as tiles: the fit chooses). Every image is sent with its category, so it is scored as the
category's tiles. Then, in one run: in-process scoring throughput (decode + tiles + model, batches
of 16 images), and `defectloop serve` on local Ray with dynamic batching (max 16) and with batch
size 1, each loaded by N requests of one image from C concurrent clients. Prints p50/p99
latency, throughput, errors, and HTTP throughput as a ratio of in-process throughput; and one 2 MP
and one 12 MP camera image end to end in process, whole and as 8 x 8 tiles: megapixels/s and peak
memory above the idle model (``--per-megapixel-only``: these alone).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "bench-token"


def train_registry(data: Path, per_category: int, out: Path) -> Path:
    from defectloop.data import load_split
    from defectloop.models import Fitter, ModelConfig, create_model
    from defectloop.registry import Registry

    counts: Counter = Counter()
    train = []
    for s in load_split(data).train:
        if counts[s.category] < per_category:
            counts[s.category] += 1
            train.append(s)
    model = create_model(ModelConfig(kind="dmad"))
    Fitter(model).fit_samples(train, progress=True)
    Registry(out).register(model)
    return out


def in_process(registry: Path, payloads: list[tuple[bytes, str]], batch: int = 16) -> tuple[float, float]:
    """Images/s and tiles/s of what a request's images go through on a replica: read at the size
    their category's tiles need, cut into tiles, scored in batches of ``batch`` images."""
    from defectloop.data import read_image
    from defectloop.features import tile_tensors
    from defectloop.scoring import ModelHandle

    handle = ModelHandle(registry)
    config = handle.served.model.config
    print(f"tiles (rows, cols): {config.tiles or 'none'}")

    def inputs(chunk: list[tuple[bytes, str]]) -> list[torch.Tensor]:
        out = []
        for data, category in chunk:
            out.append(tile_tensors(read_image(data, config.read_size(category))[0], config.tiling(category),
                                    config.image_size))
        return out

    handle.score(inputs(payloads[:batch]), [c for _, c in payloads[:batch]])  # warm-up
    t0 = time.perf_counter()
    tiles = 0
    for i in range(0, len(payloads), batch):
        chunk = payloads[i:i + batch]
        tensors = inputs(chunk)
        tiles += sum(len(t) for t in tensors)
        handle.score(tensors, [c for _, c in chunk])
    wall = time.perf_counter() - t0
    return len(payloads) / wall, tiles / wall


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def per_megapixel(registry: Path, source: Path, rounds: int = 3) -> list[dict]:
    """Camera-sized images end to end in process, as /v1/score answers one: decode and reduce
    (``read_image``), resize or cut into tiles, score, then the mask and the heatmap at the image's
    own size. Each image three times: whole (the model's input size), as the grid a category of
    such images is seen as (its aspect kept, the long side at ``max_tiles``: 6 x 8 tiles of
    256 px, 896 x 1152 px, for a 4:3 camera), and stretched to the most tiles allowed (8 x 8,
    1152 px square, as before grids followed the aspect). The model's banks are whatever they
    are: the cost is the point.

    A 2 MP and a 12 MP JPEG are made from one dev image (bicubic upscale). Peak memory is the
    process's peak resident set above the idle, warmed-up model (the kernel's peak counter reset
    through /proc/self/clear_refs before each image)."""
    import io
    from dataclasses import replace

    from PIL import Image

    from defectloop.data import read_image
    from defectloop.data.tiles import tiles_for
    from defectloop.features import tile_tensors
    from defectloop.scoring import ModelHandle

    handle = ModelHandle(registry)
    model = handle.served.model
    c = model.config
    base = Image.open(source).convert("RGB")
    rows = []
    for name, (w, h) in (("2 MP", (1632, 1224)), ("12 MP", (4000, 3000))):
        buf = io.BytesIO()
        base.resize((w, h), Image.BICUBIC).save(buf, format="JPEG", quality=92)
        data = buf.getvalue()
        model.config = replace(c, tiles={**c.tiles, "grid": tiles_for(w, h, c.image_size, c.tile_overlap, c.max_tiles),
                                         "square": [c.max_tiles] * 2})
        for view in ("whole", "grid", "square"):
            tiling = model.config.tiling(view)

            def once(data: bytes = data, tiling=tiling, view=view) -> None:
                image, (width, height) = read_image(data, model.config.read_size(view))
                p = handle.score([tile_tensors(image, tiling, model.config.image_size)], [view])[0].prediction
                p.mask(width, height)
                p.heatmap_png(width, height)

            once()  # warm-up
            idle = _rss_kb("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            best = float("inf")
            for _ in range(rounds):
                t = time.perf_counter()
                once()
                best = min(best, time.perf_counter() - t)
            peak = _rss_kb("VmHWM") - idle
            rows.append({"image": name, "view": f"{view} {'x'.join(map(str, model.config.grid(view)))} tiles",
                         "megapixels": w * h / 1e6, "s": best,
                         "megapixels_per_s": w * h / 1e6 / best, "peak_above_idle_mb": peak / 1024})
    return rows


def load_test(url: str, payloads: list[tuple[bytes, str]], n: int, clients: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(n))
    lock = threading.Lock()

    def worker():
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                data, category = payloads[i % len(payloads)]
                t = time.perf_counter()
                r = c.post(f"{url}/v1/score", params={"category": category}, files=[("files", ("x.png", data, "image/png"))])
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:100]}")

    # warm-up outside the measurement
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        for data, category in payloads[:4]:
            c.post(f"{url}/v1/score", params={"category": category}, files=[("files", ("x.png", data, "image/png"))])
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"throughput": n / wall, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "errors": len(errors), "first_errors": errors[:3]}


def serve(registry: Path, batch: int, port: int) -> subprocess.Popen:
    env = {**os.environ, "DEFECTLOOP_API_TOKEN": TOKEN, "DEFECTLOOP_MAX_BATCH_SIZE": str(batch),
           "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "defectloop.cli", "serve", "--registry", str(registry),
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(240):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("scorer did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "dev"))
    ap.add_argument("--registry")
    ap.add_argument("--per-category", type=int, default=60, help="training images per category (no --registry)")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--port", type=int, default=8311)
    ap.add_argument("--categories", default=None, help="comma-separated: load-test these categories' images only")
    ap.add_argument("--per-megapixel-only", action="store_true", help="the camera images alone, no HTTP load test")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    registry = Path(args.registry) if args.registry else train_registry(
        Path(args.data), args.per_category, Path(tempfile.mkdtemp(prefix="bench-serve-")) / "registry")
    images = sorted(p for p in Path(args.data).glob("*/test/*/*.png")
                    if not args.categories or p.parts[-4] in args.categories.split(","))
    random.Random(0).shuffle(images)
    payloads = [(p.read_bytes(), p.parts[-4]) for p in images[:64]]  # each sent with its category
    print(f"registry {registry}; {len(payloads)} distinct test images, "
          f"{np.mean([len(p) for p, _ in payloads]) / 1024:.0f} KiB on average")

    local, local_tiles = in_process(registry, payloads * 2)
    print(f"in-process (decode + tiles + score, batch 16 images): {local:.2f} img/s, {local_tiles:.1f} tiles/s")
    for r in per_megapixel(registry, images[0]):
        print(f"in-process, one {r['image']} JPEG as {r['view']} (decode + score + mask and heatmap at full size): "
              f"{r['s']:.2f} s = {r['megapixels_per_s']:.1f} MP/s, peak memory {r['peak_above_idle_mb']:.0f} MB above idle")
    if args.per_megapixel_only:
        return
    rows = {}
    for batch in (16, 1):
        proc = serve(registry, batch, args.port)
        try:
            rows[batch] = load_test(f"http://127.0.0.1:{args.port}", payloads, args.requests, args.clients)
        finally:
            proc.terminate()
            proc.wait(60)
    print(f"\n{args.requests} requests of one image, {args.clients} concurrent clients, Ray Serve on local Ray")
    print(f"{'max batch':>10s}{'img/s':>10s}{'p50 ms':>10s}{'p99 ms':>10s}{'errors':>8s}{'vs in-process':>15s}")
    for batch, r in rows.items():
        print(f"{batch:>10d}{r['throughput']:>10.2f}{r['p50_ms']:>10.0f}{r['p99_ms']:>10.0f}{r['errors']:>8d}"
              f"{r['throughput'] / local:>14.2f}x")
        if r["errors"]:
            print("   ", r["first_errors"])
    print(f"batching speed-up: {rows[16]['throughput'] / rows[1]['throughput']:.2f}x")


if __name__ == "__main__":
    main()

"""Distributed training benchmark (run on demand, not in CI).

    .venv/bin/python tests/bench/bench_train.py [--data ../shared/data/dev] [--model patchcore] [--per-category N]

One unified model over all categories of --data, trained three ways in one run through the CLI:
in-process, on 1 Ray Train worker and on 2. Prints end-to-end wall time, feature extraction
throughput and peak memory per worker, the fit (bank build) time, and the ratios to in-process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def subset(data: Path, per_category: int, out: Path) -> Path:
    """The first N train images per category (symlinks), to keep a quick run quick."""
    for cat in sorted(p for p in data.iterdir() if (p / "train").is_dir()):
        for f in sorted((cat / "train" / "good").iterdir())[:per_category]:
            dst = out / cat.name / "train" / "good" / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(f.resolve())
        (out / cat.name / "test").symlink_to((cat / "test").resolve())
        if (cat / "ground_truth").exists():
            (out / cat.name / "ground_truth").symlink_to((cat / "ground_truth").resolve())
    return out


def run(data: Path, model: str, workers: int, work: Path) -> dict:
    out = work / f"model-{workers}"
    cmd = [sys.executable, "-m", "defectloop.cli", "train", "--data", str(data), "--model", model, "--out", str(out),
           "--workers", str(workers), "--storage", str(work / "runs")]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    stats = json.loads((out / "fit.json").read_text())
    return {"wall_s": wall, "fit_s": stats["fit_s"], "workers": stats["per_worker"], "bank": stats.get("normal_bank_size"),
            "images": stats["n_train_images"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "dev"))
    ap.add_argument("--model", default="patchcore", choices=["patchcore", "dmad", "crad"])
    ap.add_argument("--per-category", type=int, default=0, help="train images per category (0: all)")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data = Path(args.data)
    if args.per_category:
        data = subset(data, args.per_category, work / "data")
    results = {w: run(data, args.model, w, work) for w in (0, 1, 2)}
    base = results[0]["wall_s"]
    print(f"\n{args.model}, {results[0]['images']} training images, bank {results[0]['bank']} "
          f"(1 worker: {results[1]['bank']}, 2 workers: {results[2]['bank']})")
    print(f"{'mode':14s}{'wall s':>9s}{'vs in-proc':>12s}{'fit s':>8s}   per worker: images, img/s, peak RSS MB")
    for w, r in results.items():
        name = "in-process" if w == 0 else f"{w} worker(s)"
        per = "; ".join(f"{x['n_images']}, {x['images_per_s']:.1f}, {x['peak_rss_mb']:.0f}" for x in r["workers"])
        print(f"{name:14s}{r['wall_s']:>9.1f}{r['wall_s'] / base:>11.2f}x{r['fit_s']:>8.1f}   {per}")
    total = {w: sum(x["images_per_s"] for x in r["workers"]) for w, r in results.items()}
    print(f"extraction throughput, all workers together: in-process {total[0]:.1f} img/s, 1 worker {total[1]:.1f}, "
          f"2 workers {total[2]:.1f} ({total[2] / total[0]:.2f}x in-process)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

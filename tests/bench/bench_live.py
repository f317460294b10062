"""The live loop on the stack `defectloop up` starts (run on demand, not in CI).

    .venv/bin/python tests/bench/bench_live.py [--data DIR] [--pool 1000] [--annotations 20] [--clients 8]

Starts the whole stack (its own Label Studio, local Ray, the scorer and the live loop) on a pool of
about ``--pool`` generated images (or ``--data`` in MVTec layout), then, in one run:

- ``--annotations`` masks submitted through the Label Studio API, one after another, on a quiet
  machine: seconds from the annotation to the bank in ``/v1/banks`` and to the affected
  predictions in Label Studio (p50/p95), how many predictions were written per annotation, and
  how many of those had not changed (must be 0);
- serving: ``--clients`` clients score single images for ``--window`` seconds alone, then while
  ``--swaps`` more annotations make bank swaps: p50/p99 and failed requests in both windows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def digest(p) -> str:
    return hashlib.sha1(json.dumps([p.result, round(p.score or 0, 4)], sort_keys=True, default=str).encode()).hexdigest()


class Load:
    """Clients scoring single images until stopped; latencies by the window they fell in."""

    def __init__(self, url: str, token: str, payloads: list[bytes], clients: int):
        self.url, self.payloads, self.clients = url, payloads, clients
        self.headers = {"Authorization": f"Bearer {token}"}
        self.samples: list[tuple[str, float, int]] = []  # (window, seconds, status)
        self.window = "idle"
        self.stop = threading.Event()

    def worker(self, k: int) -> None:
        with httpx.Client(timeout=60, headers=self.headers) as c:
            i = k
            while not self.stop.is_set():
                window, t0 = self.window, time.perf_counter()
                try:
                    status = c.post(f"{self.url}/v1/score",
                                    files=[("files", ("x.png", self.payloads[i % len(self.payloads)], "image/png"))]).status_code
                except httpx.HTTPError:
                    status = 0
                self.samples.append((window, time.perf_counter() - t0, status))
                i += self.clients

    def start(self) -> None:
        self.threads = [threading.Thread(target=self.worker, args=(k,), daemon=True) for k in range(self.clients)]
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def stats(self, window: str) -> dict:
        lat = np.array([s for w, s, _ in self.samples if w == window]) * 1000
        failed = sum(1 for w, _, st in self.samples if w == window and st != 200)
        return {"requests": len(lat), "failed": failed, "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
                "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="MVTec layout (default: a generated pool)")
    ap.add_argument("--pool", type=int, default=1000)
    ap.add_argument("--annotations", type=int, default=20)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--window", type=float, default=20.0, help="seconds of scoring alone")
    ap.add_argument("--swaps", type=int, default=3, help="annotations (bank swaps) under the scoring load")
    args = ap.parse_args()
    from label_studio_sdk import LabelStudio

    from defectloop.data import load_mask
    from defectloop.data.synthetic import make_dataset
    from defectloop.labeling.brush import BrushRLE

    work = Path(tempfile.mkdtemp(prefix="defectloop-bench-live-"))
    data = Path(args.data).resolve() if args.data else None
    if data is None:
        per = math.ceil(args.pool / 3)
        bad = max(1, per // 10)
        data = make_dataset(work / "files" / "data", n_train=30, n_test_good=per - bad, n_test_bad=bad, size=256, seed=0)
    state = work / "state"
    env = {**os.environ, "DEFECTLOOP_API_TOKEN": "bench-token", "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(work / "stack.log", "w")  # noqa: SIM115 - lives as long as the stack
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "defectloop.cli", "up", "--data", str(data), "--state", str(state)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    try:
        while not (state / "stack.json").is_file():
            if proc.poll() is not None or time.perf_counter() - t0 > 1800:
                raise RuntimeError(f"the stack did not start; see {work / 'stack.log'}")
            time.sleep(1)
        info = json.loads((state / "stack.json").read_text())
        print(f"stack up in {time.perf_counter() - t0:.0f} s (state {state})", flush=True)
        ls = LabelStudio(base_url=info["label_studio_url"], api_key=info["label_studio_token"])
        project = info["project_id"]
        headers = {"Authorization": f"Bearer {info['api_token']}"}

        def banks() -> dict:
            return httpx.get(f"{info['serve_url']}/v1/banks", headers=headers, timeout=30).json()

        tasks = [t for t in ls.tasks.list(project=project, fields="all")]
        defective = [t for t in tasks if Path(t.meta["path"]).parent.name != "good"]
        print(f"pool: {len(tasks)} tasks, {len(defective)} defective", flush=True)
        payloads = [Path(t.data["source"]).read_bytes() for t in tasks[:32]]
        while banks()["loop"].get("pending_events") is None:  # the loop's first turn (reconcile) done
            time.sleep(1)

        to_bank, to_preds, written, unchanged_written = [], [], [], []
        done: set[int] = set()

        def predictions() -> dict:
            return {p.task: (p.id, p.updated_at, digest(p)) for p in ls.predictions.list(project=project)}

        def annotate(t, audit: bool = True) -> tuple[float, float, int, int]:
            """(s to the bank, s to the predictions, predictions written, of those unchanged). ``audit``
            reads every prediction before and after (heavy: left out while serving is measured)."""
            before = predictions() if audit else {}
            version = banks()["bank_version"]
            rel = Path(t.meta["path"])  # <category>/test/<defect>/<name>, relative to the data folder
            mask = load_mask(data / rel.parts[0] / "ground_truth" / rel.parent.name / f"{rel.stem}_mask.png")
            h, w = mask.shape
            result = [{"type": "brushlabels", "from_name": "defect", "to_name": "image", "original_width": w,
                       "original_height": h, "value": {"format": "rle", "rle": BrushRLE().encode(mask),
                                                       "brushlabels": [rel.parent.name]}}]
            start = time.perf_counter()
            ls.annotations.create(id=t.id, result=result)
            while banks()["bank_version"] == version and time.perf_counter() - start < 120:
                time.sleep(0.05)
            bank_s = time.perf_counter() - start
            labeled = len(done) + 1
            while time.perf_counter() - start < 300:  # the turn that applied it ends once the re-ranking is written
                loop = banks()["loop"]
                if loop.get("labeled_tasks", 0) >= labeled and loop.get("pending_events") == 0:
                    break
                time.sleep(0.2)
            done.add(t.id)
            preds_s = time.perf_counter() - start
            now = predictions() if audit else {}
            changed = {k: v for k, v in now.items() if k in before and v[1] != before[k][1]}
            return bank_s, preds_s, len(changed), sum(1 for k, v in changed.items() if v[2] == before[k][2])

        for t in defective[:args.annotations]:
            b, p, n, u = annotate(t)
            to_bank.append(b)
            to_preds.append(p)
            written.append(n)
            unchanged_written.append(u)
            print(f"annotation {len(to_bank)}: bank {b:.2f} s, predictions {p:.1f} s, {n} written ({u} unchanged)",
                  flush=True)
        load = Load(info["serve_url"], info["api_token"], payloads, args.clients)
        load.start()
        time.sleep(args.window)
        load.window = "swaps"
        for t in defective[args.annotations:args.annotations + args.swaps]:
            annotate(t, audit=False)
        load.window = "after"
        time.sleep(2)
        load.finish()
        idle, swaps = load.stats("idle"), load.stats("swaps")
        out = {"pool": len(tasks), "annotations": len(to_bank),
               "to_banks_s": {"p50": float(np.percentile(to_bank, 50)), "p95": float(np.percentile(to_bank, 95))},
               "to_predictions_s": {"p50": float(np.percentile(to_preds, 50)), "p95": float(np.percentile(to_preds, 95)),
                                    "max": float(max(to_preds))},
               "predictions_written_per_annotation": {"mean": float(np.mean(written)), "max": int(max(written))},
               "written_but_unchanged": int(sum(unchanged_written)),
               "scoring_alone": idle, "scoring_during_swaps": swaps,
               "p99_ratio": (swaps["p99_ms"] / idle["p99_ms"]) if idle["p99_ms"] else None}
        print(json.dumps(out, indent=1))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


if __name__ == "__main__":
    main()

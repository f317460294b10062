"""The ``defectloop`` command: train, evaluate, score, demo.

Model settings come from defaults, then a JSON config file (``--config`` or ``DEFECTLOOP_CONFIG``),
then command-line flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from defectloop.labeling.policies import POLICIES

if TYPE_CHECKING:
    from defectloop.labeling.scorer import ScorerStatus

log = logging.getLogger("defectloop")


def _model_config(args: argparse.Namespace):
    from defectloop.models import ModelConfig

    data: dict = {}
    config_file = args.config or os.environ.get("DEFECTLOOP_CONFIG")
    if config_file:
        data.update(json.loads(Path(config_file).read_text()))
    for key in ("backbone", "backbone_checkpoint", "seed", "image_size"):
        if getattr(args, key, None) is not None:
            data[key] = getattr(args, key)
    data["kind"] = args.model
    return ModelConfig.from_dict(data)


def _categories(value: str | None) -> list[str] | None:
    return [c.strip() for c in value.split(",") if c.strip()] if value else None


def cmd_train(args: argparse.Namespace) -> int:
    from defectloop.registry import Registry, save_model
    from defectloop.workers.train import train_model

    config = _model_config(args)
    storage = args.storage or (f"{args.registry.rstrip('/')}/runs" if args.registry else None)
    model, stats = train_model(config, args.data, _categories(args.categories), args.anomalies_per_class,
                               args.workers, args.gpus_per_worker, args.ray_address, storage,
                               max_failures=args.max_failures)
    for path, reason in stats.get("skipped", []):
        print(f"skipped {path}: {reason}", file=sys.stderr)
    fit_json = {"fit.json": json.dumps(stats, indent=1, default=str)}
    if args.registry:
        version = Registry(args.registry).register(model, files=fit_json)
        out = f"{args.registry} ({version})"
        print(f"registered {config.kind} model as {version} in {args.registry}")
    else:
        out = save_model(model, args.out, files=fit_json)
    where = f" on {args.workers} Ray Train worker(s)" if args.workers else ""
    print(f"trained {config.kind} on {stats['n_train_images']} images of {len(stats['categories'])} categories "
          f"({len(stats['skipped'])} skipped){where} in {stats['fit_seconds']:.1f}s: normal bank "
          f"{stats.get('normal_bank_size', 0)}, abnormal bank {stats.get('abnormal_bank_size', 0)}; saved to {out}")
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    """Retrain from the pool and the labels so far: here, or as a Ray job (--submit)."""
    if args.submit:
        from defectloop.workers.jobs import submit_retrain

        job = submit_retrain(args.registry, args.data, args.workers, args.anomalies_per_class, args.categories,
                             args.address, args.python, full=args.full)
        print(job)
        return 0
    from defectloop.workers.retrain import main as retrain_main

    argv = ["--registry", args.registry, "--data", args.data, "--workers", str(args.workers),
            "--anomalies-per-class", str(args.anomalies_per_class)]
    if args.categories:
        argv += ["--categories", args.categories]
    if args.full:
        argv.append("--full")
    return retrain_main(argv)


def cmd_jobs(args: argparse.Namespace) -> int:
    from defectloop.workers import jobs

    if args.action == "status":
        info = jobs.status(args.job_id, args.address)
        print(f"{info['job_id']}\t{info['status']}\t{info['message'] or ''}")
        return 0 if info["status"] != "FAILED" else 1
    print(jobs.logs(args.job_id, args.address), end="")
    return 0


def evaluate_model(model, data: str, categories: list[str] | None, k: int, seed: int, plots: Path | None = None):
    """Score the test split of ``data`` and compute metrics (and plots)."""
    from defectloop.data import load_image, load_split
    from defectloop.evaluation import evaluate_extracted
    from defectloop.features import extract
    from defectloop.models import tiled

    split = load_split(data, categories, k, seed)
    test = extract(model.embedder, tiled(split.test, model.config), model.config.image_size, progress="scoring")
    done = evaluate_extracted(model, test)
    samples, scores, maps = done.samples, done.scores, done.maps
    cats = [s.category for s in samples]
    labels = np.array([s.label for s in samples])
    if plots is not None:
        from defectloop.data.tiles import resized
        from defectloop.plots import overlays, score_histograms

        plots.mkdir(parents=True, exist_ok=True)
        score_histograms(plots / "score_histograms.png", cats, scores.numpy(), labels,
                         {c: model.calibration.threshold(c) for c in set(cats)})
        for cat in sorted(set(cats)):
            idx = [i for i in np.argsort(-scores.numpy()) if cats[i] == cat][:8]
            imgs = [resized(load_image(samples[i].path), *maps[i].shape) for i in idx]  # as its map sees it
            titles = [f"{samples[i].defect} {scores[i]:.2f}" for i in idx]
            overlays(plots / f"overlay_{cat}.png", imgs, np.stack([maps[i].numpy() for i in idx]), titles,
                     [done.masks[i] for i in idx])
    return done.result


def print_table(result: dict) -> None:
    from defectloop.metrics import METRIC_KEYS, fmt

    serves = any("serves" in m for m in result["categories"].values())  # DMAD: the head's score or the banks'
    head = (f"{'category':18s}" + "".join(f"{k:>12s}" for k in METRIC_KEYS) + f"{'n_test':>8s}{'tiles':>7s}"
            + ("  scored by" if serves else ""))
    print(head)
    print("-" * len(head))
    for name, m in [*result["categories"].items(), ("mean", result["mean"])]:
        tiles = "x".join(map(str, m["tiles"])) if "tiles" in m else ""  # rows x cols
        print(f"{name:18s}" + "".join(f"{fmt(m[k]):>12s}" for k in METRIC_KEYS) + f"{m['n_test']:>8d}{tiles:>7s}"
              + (f"  {m.get('serves', '')}" if serves else ""))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from defectloop.models import load_model
    from defectloop.registry import Registry, resolve_model_dir
    from defectloop.store import open_store

    model = load_model(resolve_model_dir(args.model))
    result = evaluate_model(model, args.data, _categories(args.categories), args.anomalies_per_class,
                            args.seed, Path(args.plots) if args.plots else None)
    print_table(result)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    if Registry.is_registry(args.model):  # the metrics go with the version they measured
        reg = Registry(args.model)
        reg.attach(reg.resolve(), "metrics.json", text)
    else:
        open_store(args.model).write("metrics.json", text.encode())
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Score images: a line each (score, threshold, decision, heatmap), or one JSON list with ``--json``."""
    from defectloop.data import ImageError, load_image
    from defectloop.data.tiles import resized
    from defectloop.features import tile_tensors
    from defectloop.models import load_model
    from defectloop.registry import resolve_model_dir

    model = load_model(resolve_model_dir(args.model))
    size = model.config.image_size
    paths = [Path(p).resolve() for p in args.images]
    # heatmaps mirror the inputs' paths below their common folder: two 000.png never overwrite each other
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    failed, results = 0, []
    for arg, path in zip(args.images, paths, strict=True):
        try:
            image = load_image(path)
            img = tile_tensors(image, model.config.tiling(args.category), size)
        except ImageError as e:
            print(f"error {e}", file=sys.stderr)
            failed += 1
            continue
        (p,) = model.predict(img, [args.category], [model.config.grid(args.category)])
        heatmap = None
        if args.heatmaps:
            from defectloop.plots import overlays

            heatmap = Path(args.heatmaps) / path.relative_to(root).with_name(f"{path.stem}_heatmap.png")
            heatmap.parent.mkdir(parents=True, exist_ok=True)
            overlays(heatmap, [resized(image, *p.amap.shape)], p.amap[None],  # the image as its map sees it
                     [f"{p.score:.3f} {p.decision}"])
        threshold = "none" if p.threshold is None else f"{p.threshold:.4f}"
        whose = args.category if p.known_category else "all categories"
        results.append({"image": arg, "score": p.score, "normalised_score": p.normalised_score, "threshold": p.threshold,
                        "threshold_of": whose, "decision": p.decision, "heatmap": str(heatmap) if heatmap else None})
        if not args.json:
            print(f"{arg}\tscore {p.score:.4f}\tthreshold {threshold} ({whose})\t{p.decision}"
                  + (f"\t{heatmap}" if heatmap else ""))
    if args.json:
        print(json.dumps(results, indent=1))
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The labeling loop end to end: Label Studio, the scorer, a simulated annotator (see defectloop.demo)."""
    from defectloop.demo import DemoConfig, run_demo
    from defectloop.process import exit_on_sigterm

    exit_on_sigterm()  # a stopped demo stops its Label Studio and scorer too
    out = Path(args.out).resolve()
    log_file = log_to_file(out / "logs" / "demo.log", args.verbose)
    cfg = DemoConfig(out=out, data=Path(args.data) if args.data else None, rounds=args.rounds, batch=args.batch,
                     defect_rate=args.defect_rate, pool_normals=args.pool_normals, policy=args.policy,
                     retrain_every=args.retrain_every, steps=args.steps, seed=args.seed, keep_running=args.keep_running,
                     parity=args.parity, image_level=tuple(_categories(args.image_level) or ()))
    t0 = time.perf_counter()
    run_demo(cfg, args.json)
    print(f"\ndone in {(time.perf_counter() - t0) / 60:.1f} min. Outputs in {out}:\n"
          f"  report.json          the rounds of every policy\n"
          f"  learning_curve.png   defects found and held-out AUROC against labels shown\n"
          f"  label-studio/        Label Studio's data (its projects, their tasks and predictions)\n"
          f"  logs/{log_file.name}        this run's log (the console showed its warnings)")
    return 0


def log_to_file(path: Path, verbose: bool) -> Path:
    """Logs go to ``path`` (INFO, or DEBUG when verbose); the console keeps warnings and what is printed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for h in root.handlers:
        h.setLevel(logging.WARNING)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.addHandler(handler)
    return path


def cmd_ingest(args: argparse.Namespace) -> int:
    from defectloop.labeling.workspace import pool_images
    from defectloop.store import is_s3
    from defectloop.workers.ingest import ingest

    config = _model_config(args)
    if args.registry:  # the features the served version reads: its backbone, input size and tiles
        from defectloop.models import read_config
        from defectloop.registry import resolve_model_dir

        config = read_config(resolve_model_dir(args.registry))
    images = pool_images(args.pool)  # each image's category: the first folder below the pool
    sources = [p.uri for p in images]
    if not sources:
        print(f"no images below {args.pool}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    rows = ingest(sources, args.cache, config, concurrency=args.concurrency, batch_size=args.batch_size,
                  num_cpus=args.cpus_per_actor, ray_address=args.ray_address,
                  roots=[] if is_s3(args.pool) else [args.pool], categories=[p.category for p in images])
    seconds = time.perf_counter() - t0
    embedded, failed = sum(r.embedded for r in rows), [r for r in rows if r.error]
    nodes = sorted({r.node for r in rows if r.embedded})
    print(f"{len(rows)} images in {seconds:.1f} s: {embedded} embedded ({embedded / seconds:.1f} img/s) on "
          f"{len(nodes)} node(s), {len(rows) - embedded - len(failed)} already cached, {len(failed)} unreadable")
    for r in failed:
        print(f"  {r.source}: {r.error}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps([{**r.__dict__, "size": list(r.size)} for r in rows], indent=1))
    return 1 if failed else 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the Ray Serve scorer on local Ray (or a cluster) in the foreground."""
    import secrets

    from defectloop.serve.settings import ServeSettings

    overrides = {"model": args.registry or args.model, "version": args.version,
                 "auth": False if args.no_auth else None}
    try:
        settings = ServeSettings.load(args.serve_config, **overrides)
    except ValueError as e:
        if "no API token" not in str(e):
            raise
        token = secrets.token_urlsafe(24)  # auth stays on: make a token and tell the user
        settings = ServeSettings.load(args.serve_config, api_token=token, **overrides)
        print(f"API token (set DEFECTLOOP_API_TOKEN to choose your own): {token}", flush=True)
    from defectloop.serve.app import run_foreground

    run_foreground(settings, host=args.host, port=args.port, ray_address=args.ray_address,
                   replicas=args.replicas, gpus=args.gpus)
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    """Label Studio side of the loop: init, sync, round, status."""
    from defectloop.labeling import workspace as wsp
    from defectloop.labeling.inbox import EventInbox
    from defectloop.labeling.live import LiveLoop

    token = args.token or os.environ.get("LABEL_STUDIO_API_KEY")
    if not token:
        raise ValueError("no Label Studio token: set LABEL_STUDIO_API_KEY or pass --token")
    scorer_token = args.scorer_token or os.environ.get("DEFECTLOOP_API_TOKEN")
    if args.action == "init":
        url = args.url or os.environ.get("LABEL_STUDIO_URL")
        if not (url and args.registry and args.pool):
            raise ValueError("label init needs --url (or LABEL_STUDIO_URL), --registry and --pool")
        loop = wsp.init(args.state, url, token, args.registry, args.pool, args.title,
                        _categories(args.defects) or ["defect"], args.document_root, args.policy, args.batch,
                        args.retrain_after, args.scorer, scorer_token, args.feature_cache)
        print(f"project {loop.project.id}: {len(loop.tasks)} tasks, predictions {loop.label}; "
              f"{loop.project.url}/projects/{loop.project.id} (tab 'Most anomalous first')"
              + (f"; ML backend {args.scorer}/ls" if args.scorer else ""))
        return 0
    ws = wsp.Workspace.load(args.state)
    loop = wsp.open_loop(args.state, token, ws, scorer_token, args.scorer_wait)
    if args.action == "status":
        ledger = loop.feedback.ledger.values()
        kinds = {k: sum(1 for e in ledger if e["kind"] == k) for k in ("mask", "anomalous", "normal")}
        print(f"project {ws.project_id} at {ws.url}: {len(loop.tasks)} tasks, {len(loop.labeled())} labeled "
              f"({kinds['mask']} with masks, {kinds['anomalous']} anomalous without, {kinds['normal']} normal)\n"
              f"model {loop.label} (project shows {loop.project.model_version()}), abnormal bank "
              f"{loop.abnormal_entries()} entries; policy {ws.policy}, batch {ws.batch}")
        for cat, r in loop.label_thresholds().items():
            print(f"threshold of {cat} moved by {r['labels']} confirmed image(s): {r['fitted']:.3f} -> {r['threshold']:.3f}")
        for cat, r in loop.mask_edges().items():
            print(f"mask edge of {cat} set by {r['masks']} confirmed masks: {r['level']:.2f} of an image's rise")
        _print_live_status(Path(args.state), loop)
        return 0
    # one turn of the live loop, the same code the service runs: webhook events, the polling sync, a
    # retraining when one is due (waited for here, and served only if it is not worse)
    live = LiveLoop(loop, EventInbox(args.inbox or Path(args.state) / "inbox"), _retrain_runner(args, ws),
                    ws.retrain_after)
    events = live.step()
    timing = live.reconcile()
    print(f"sync: {events} webhook event(s), {timing.sync.applied} annotation change(s), {timing.sync.annotations} "
          f"annotations in all; model {loop.label}; {timing.seconds:.1f}s")
    scorer_ok = _report_scorer(timing.scorer)
    live.follow_retraining()
    r = live.retraining
    if r.state == "running":
        print(f"retraining {r.job}: {r.trigger}", flush=True)
        while r.state == "running":
            time.sleep(1.0)
            live.follow_retraining()
        print(f"retraining {r.state}: {r.reason}")
        if r.state == "promoted":
            scorer_ok = _report_scorer(loop.check_scorer()) and scorer_ok
    elif live.runner is None and live.retrain_due():
        print(f"retraining due ({live.retrain_due()}): pass --data DIR to retrain here, or --ray-address too for a Ray job")
    live.save()
    if args.action == "round":
        selected = loop.select()
        print(f"next {len(selected)} task(s) by '{ws.policy}': {', '.join(map(str, selected))}")
    return 0 if scorer_ok else 1


def _retrain_runner(args: argparse.Namespace, ws):
    """How `label sync` retrains: a Ray job (--ray-address), a child process (--data), or not at all."""
    from defectloop.workers.jobs import ProcessRunner, RayJobRunner

    if not args.data:
        return None
    extra = ["--workers", str(args.workers)] if args.workers else []
    if args.ray_address:
        return RayJobRunner(ws.registry, args.data, args.ray_address, hold_back=args.hold_back, extra=extra)
    return ProcessRunner(ws.registry, args.data, Path(args.state) / "retrain-logs", args.hold_back, extra)


def _print_live_status(state: Path, loop) -> None:
    """What the live loop (when one runs) and the sync have set aside, and the last retraining."""
    live = json.loads((state / "live.json").read_text())["status"] if (state / "live.json").is_file() else {}
    quarantined = live.get("quarantined") or [{"annotation": aid, **q} for aid, q in loop.sync.quarantined.items()]
    if live:
        print(f"live loop: {live.get('pending_events', 0)} event(s) pending, serving {live.get('bank_label')}")
    print(f"quarantined: {len(quarantined)}")
    for q in quarantined:
        what = f"annotation {q['annotation']} (task {q.get('task')})" if "annotation" in q else f"event {q.get('event')}"
        print(f"  {what}: {q.get('reason')}")
    retraining = live.get("retraining") or {}
    if retraining.get("job"):
        print(f"last retraining {retraining['job']} ({retraining.get('trigger')}): {retraining['state']}: "
              f"{retraining.get('reason')}")


def _report_scorer(status: ScorerStatus | None) -> bool:
    """Print whether the scorer serves the loop's label; False when it does not (the exit status says so)."""
    if status is None:
        return True
    print(status, file=sys.stdout if status.ok else sys.stderr)
    return status.ok


def cmd_up(args: argparse.Namespace) -> int:
    """The whole stack on embedded defaults: local Ray, Label Studio, the store, the Serve application."""
    from defectloop.stack import StackConfig, run

    config_file = args.config or os.environ.get("DEFECTLOOP_CONFIG")
    return run(StackConfig(Path(args.state), Path(args.data) if args.data else None, args.ray_address, args.port,
                           policy=args.policy, batch=args.batch, retrain_after=args.retrain_after,
                           reconcile_s=args.reconcile_s, replicas=args.replicas,
                           model=json.loads(Path(config_file).read_text()) if config_file else None,
                           label_studio_url=args.label_studio_url, feature_cache=args.feature_cache))


def cmd_down(args: argparse.Namespace) -> int:
    from defectloop.stack import down

    return down(Path(args.state))


def cmd_models(args: argparse.Namespace) -> int:
    """Registry operations: list, show, promote, rollback, gc."""
    from defectloop.registry import Registry

    reg = Registry(args.registry)
    if args.action == "list":
        print(f"{'version':10s}{'kind':12s}{'created (UTC)':22s}{'bank':8s}current")
        for v in reg.list():
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v.created))
            print(f"{v.id:10s}{v.kind:12s}{created:22s}{reg.bank(v.id) or '-':8s}{'*' if v.current else ''}")
    elif args.action == "show":
        print(json.dumps(reg.info(args.version), indent=1))
    elif args.action == "promote":
        if not args.version:
            raise ValueError("promote needs a version")
        reg.promote(args.version)
        print(f"current: {reg.label()}")
    elif args.action == "rollback":
        print(f"rolled back to {reg.rollback()}")
    elif args.action == "gc":
        deleted = reg.gc(args.keep)
        print(f"deleted {len(deleted)} version(s): {', '.join(deleted) or '-'}; kept {', '.join(reg.ids())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="defectloop", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def model_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", choices=["dmad", "patchcore", "crad"], default="dmad")
        sp.add_argument("--backbone", help="tf_efficientnet_lite0/1/2, mobilenetv2, or a timm name with a checkpoint")
        sp.add_argument("--backbone-checkpoint", help="local weights file for --backbone")
        sp.add_argument("--image-size", type=int)
        sp.add_argument("--config", help="JSON file of model settings (default: $DEFECTLOOP_CONFIG)")

    t = sub.add_parser("train", help="train one unified model over categories")
    t.add_argument("--data", required=True, help="folder in MVTec layout")
    t.add_argument("--categories", help="comma-separated subset (default: all)")
    t.add_argument("--anomalies-per-class", type=int, default=0, help="annotated test anomalies moved into training")
    t.add_argument("--seed", type=int, default=0)
    model_opts(t)
    t.add_argument("--workers", type=int, default=0, help="Ray Train workers (default 0: in this process)")
    t.add_argument("--gpus-per-worker", type=float, default=0.0)
    t.add_argument("--ray-address", help="Ray cluster to use (default: start a local one)")
    t.add_argument("--storage", help="Ray Train checkpoints (default: <registry>/runs, local or s3://)")
    t.add_argument("--max-failures", type=int, default=2, help="worker failures Ray Train recovers from")
    dest = t.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", help="model version directory to write (or s3://bucket/prefix)")
    dest.add_argument("--registry", help="registry folder or s3://bucket/prefix: register as a new current version")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="metrics of a model on a data set's test split")
    e.add_argument("--model", required=True, help="model version directory or registry")
    e.add_argument("--data", required=True)
    e.add_argument("--categories")
    e.add_argument("--anomalies-per-class", type=int, default=0, help="as in training: seen anomalies leave the test set")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", help="write metrics JSON here")
    e.add_argument("--plots", help="write PNG overlays and score histograms here")
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("score", help="score image files")
    s.add_argument("--model", required=True, help="model version directory or registry")
    s.add_argument("--category", help="category for the decision threshold")
    s.add_argument("--heatmaps", help="write a heatmap PNG per image below this folder (paths as the inputs')")
    s.add_argument("--json", action="store_true", help="one JSON list of the results instead of a line per image")
    s.add_argument("images", nargs="+")
    s.set_defaults(func=cmd_score)

    ig = sub.add_parser("ingest", help="embed a pool into the feature cache with Ray Data (once per image and backbone)")
    ig.add_argument("--pool", required=True, help="folder or s3://bucket/prefix of images (recursive)")
    ig.add_argument("--cache", required=True, help="feature cache: folder or s3://bucket/prefix")
    ig.add_argument("--concurrency", type=int, help="backbone actors (default: one per --cpus-per-actor of the cluster)")
    ig.add_argument("--cpus-per-actor", type=float, default=1.0)
    ig.add_argument("--batch-size", type=int, default=16)
    ig.add_argument("--ray-address", help="Ray cluster to use (default: start a local one)")
    ig.add_argument("--json", help="write one row per image here (source, digest, size, embedded, node)")
    ig.add_argument("--registry", help="registry or model version (local or s3://): embed as its current version "
                    "sees images (backbone, input size, tiles per category) instead of --config and the flags below")
    model_opts(ig)
    ig.set_defaults(func=cmd_ingest)

    v = sub.add_parser("serve", help="HTTP scoring service + Label Studio ML backend on Ray Serve (foreground)")
    src = v.add_mutually_exclusive_group()
    src.add_argument("--registry", help="registry folder: serve its current version, follow updates")
    src.add_argument("--model", help="a model version directory (or a registry)")
    v.add_argument("--version", help="pin this registry version instead of following the current one")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--serve-config", help="YAML/JSON scorer settings (default: $DEFECTLOOP_SERVE_CONFIG)")
    v.add_argument("--no-auth", action="store_true", help="no API token (local demo only)")
    v.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    v.add_argument("--replicas", type=int, default=None, help="scorer replicas (default: 2 on 4 cores or more, else 1)")
    v.add_argument("--gpus", type=float, default=0.0, help="GPUs per replica")
    v.set_defaults(func=cmd_serve)

    r = sub.add_parser("retrain", help="new version from the pool and the labels so far (here or as a Ray job)")
    r.add_argument("--registry", required=True, help="registry folder or s3://bucket/prefix")
    r.add_argument("--data", required=True, help="image pool in MVTec layout")
    r.add_argument("--categories")
    r.add_argument("--anomalies-per-class", type=int, default=0)
    r.add_argument("--workers", type=int, default=0, help="Ray Train workers (0: one process)")
    r.add_argument("--full", action="store_true", help="fit every part anew instead of warm from the current version")
    r.add_argument("--submit", action="store_true", help="submit to a Ray cluster (Jobs API) and print the job id")
    r.add_argument("--address", help="Ray dashboard address for --submit (default $RAY_ADDRESS or http://127.0.0.1:8265)")
    r.add_argument("--python", default="python", help="interpreter on the cluster that has defectloop installed")
    r.set_defaults(func=cmd_retrain)

    j = sub.add_parser("jobs", help="status or logs of a submitted Ray job")
    j.add_argument("action", choices=["status", "logs"])
    j.add_argument("job_id")
    j.add_argument("--address", help="Ray dashboard address (default $RAY_ADDRESS or http://127.0.0.1:8265)")
    j.set_defaults(func=cmd_jobs)

    lb = sub.add_parser("label", help="the Label Studio loop: init a project, sync feedback, next round, status")
    lb.add_argument("action", choices=["init", "sync", "round", "status"])
    lb.add_argument("--state", default="defectloop-label", help="folder remembering this labeling setup")
    lb.add_argument("--url", help="Label Studio URL (default $LABEL_STUDIO_URL)")
    lb.add_argument("--token", help="Label Studio token (default $LABEL_STUDIO_API_KEY)")
    lb.add_argument("--registry", help="init: registry folder or s3://bucket/prefix")
    lb.add_argument("--pool", help="init: image folder (category = first subfolder) or s3://bucket/prefix")
    lb.add_argument("--document-root", help="init: Label Studio's LOCAL_FILES_DOCUMENT_ROOT (local pools)")
    lb.add_argument("--title", default="defectloop")
    lb.add_argument("--defects", help="init: comma-separated defect labels (default: defect)")
    lb.add_argument("--policy", default="adaptive", choices=list(POLICIES))
    lb.add_argument("--batch", type=int, default=20)
    lb.add_argument("--retrain-after", type=int, default=20, help="confirmed anomalies that trigger a retraining")
    lb.add_argument("--feature-cache", help="init: feature cache by image content (folder or s3://) that "
                    "`defectloop ingest` fills: cached images are not embedded again")
    lb.add_argument("--inbox", help="the scorer's event inbox (webhooks), e.g. <registry>/inbox")
    lb.add_argument("--data", help="training data (MVTec layout) to retrain on: in a child process, or as a Ray job "
                                   "with --ray-address")
    lb.add_argument("--hold-back", type=float, default=0.2,
                    help="share of confirmed labels a retraining leaves out, to judge its version on")
    lb.add_argument("--workers", type=int, default=0, help="Ray Train workers for the retraining")
    lb.add_argument("--ray-address", help="submit the retraining as a Ray job to this dashboard address (with --data)")
    lb.add_argument("--scorer", help="init: the scorer's URL, connected as the project's ML backend (with its webhook)")
    lb.add_argument("--scorer-token", help="the scorer's API token (default $DEFECTLOOP_API_TOKEN)")
    lb.add_argument("--scorer-wait", type=float, default=120.0,
                    help="seconds to wait for the scorer to serve a new label (exit status 1 if it does not)")
    lb.set_defaults(func=cmd_label)

    m = sub.add_parser("models", help="registry operations: list, show, promote, rollback, gc")
    m.add_argument("action", choices=["list", "show", "promote", "rollback", "gc"])
    m.add_argument("version", nargs="?", help="for show (default: current) and promote")
    m.add_argument("--registry", required=True, help="registry folder or s3://bucket/prefix")
    m.add_argument("--keep", type=int, default=5, help="gc: versions to keep (newest first)")
    m.set_defaults(func=cmd_models)

    up = sub.add_parser("up", help="start the whole stack: local Ray, Label Studio, scorer and live loop (foreground)")
    up.add_argument("--data", help="MVTec layout (*/train/good trains, */test/** is the pool) or a folder of images "
                                   "(default: a generated data set)")
    up.add_argument("--state", default="defectloop-stack", help="folder for the registry, Label Studio and the loop")
    up.add_argument("--ray-address", help="run on this Ray cluster instead of a local one")
    up.add_argument("--port", type=int, default=0, help="the scorer's HTTP port (default: a free one)")
    up.add_argument("--policy", default="adaptive", choices=list(POLICIES))
    up.add_argument("--batch", type=int, default=20, help="tasks the ranking puts first")
    up.add_argument("--retrain-after", type=int, default=20, help="new confirmed masks that start a retraining")
    up.add_argument("--reconcile-s", type=float, default=120.0, help="seconds between polling syncs")
    up.add_argument("--feature-cache", help="feature cache by image content (folder or s3://) that `defectloop ingest` "
                    "fills: the pool's cached images are not embedded again")
    up.add_argument("--replicas", type=int, default=None, help="scorer replicas (default: 2 on 4 cores or more, else 1)")
    up.add_argument("--config", help="JSON settings of the first model (default: $DEFECTLOOP_CONFIG, else the defaults)")
    up.add_argument("--label-studio-url", help="use this Label Studio (token in LABEL_STUDIO_API_KEY) instead of "
                                               "starting one; the data must be below its LOCAL_FILES_DOCUMENT_ROOT")
    up.set_defaults(func=cmd_up)

    dn = sub.add_parser("down", help="stop the stack that `up` started")
    dn.add_argument("--state", default="defectloop-stack")
    dn.set_defaults(func=cmd_down)

    d = sub.add_parser("demo", help="the labeling loop end to end on one machine (no arguments needed)")
    d.add_argument("--data", help="MVTec-layout pool instead of generated data")
    d.add_argument("--out", default="defectloop-demo",
                   help="where everything goes: report, learning curve, Label Studio data, logs (default: ./defectloop-demo)")
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument("--batch", type=int, default=10, help="tasks the annotator labels per round")
    d.add_argument("--defect-rate", type=float, default=0.1, help="fraction of defective images in the pool")
    d.add_argument("--pool-normals", type=float, default=0.5,
                   help="share of the normal training images that join the unlabeled pool")
    d.add_argument("--policy", default="adaptive", choices=list(POLICIES))
    d.add_argument("--retrain-every", type=int, default=2, help="retrain every K rounds (0: never)")
    d.add_argument("--steps", type=int, default=500, help="DMAD scorer training steps (a warm retraining: a fifth)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--keep-running", action="store_true", help="leave Label Studio and the scorer up at the end")
    d.add_argument("--parity", action="store_true",
                   help="after each round, also fit a model from scratch on the same labels (batch_image_auroc; a fit per round)")
    d.add_argument("--image-level", metavar="CATS",
                   help="comma-separated categories the annotator labels normal/anomalous without drawing masks")
    d.add_argument("--json", help="also write the report (the rounds of every policy) here")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # one line per HTTP request to Label Studio or the scorer buries what happened
        logging.getLogger("httpx").setLevel(logging.WARNING)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, LookupError, RuntimeError, PermissionError) as e:
        print(f"defectloop: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The retraining job: a new model version from the image pool and the labels gathered so far.

    python -m defectloop.workers.retrain --registry REG --data POOL [--workers N] [--anomalies-per-class K] [--full]

Submitted to a Ray cluster by ``defectloop retrain --submit`` (Ray Jobs API) or run by KubeRay's
RayJob (infra/k8s/rayjob-retrain.yaml). It fits with the current version's settings (Ray Train
when --workers is given) and learns from what annotators confirmed: the defects in the served
abnormal bank are trained on as real anomalies (they stay in the new version's bank), and the pool
images they confirmed normal (the registry's labels/normal.json) join the normal training images.
The labels held back (``--hold-back``) are not trained on: the normals are calibrated on, and with
the held-back defective images (labels/defective.json) they judge, per category, whether the
learned head serves or the banks' score alone (models/head_choice.py).
By default it fits warm from the current version: the normal bank keeps its entries and gains
the new normal images' patches it does not cover, and the learned head continues from its weights,
so labels refine the served model instead of a fresh draw replacing it (``--full``: everything
anew, e.g. after many new images). Then it registers the new version; a run that fails registers
nothing, and the scorer keeps serving the last good version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

from defectloop.data import Sample
from defectloop.models import AbnormalMemory, ModelConfig, held_back
from defectloop.registry import Registry
from defectloop.store import CACHE_DIR, is_s3, open_store
from defectloop.workers.train import train_model

log = logging.getLogger("defectloop.retrain")


def confirmed_images(reg: Registry, label: str = "normal", cache: Path = CACHE_DIR / "pool", hold_back: float = 0.0
                     ) -> tuple[list[Sample], list[Sample]]:
    """Pool images annotators confirmed ``label`` ("normal" or "defective"), as samples (S3 ones
    downloaded once): (to train on, held back), those held back (``held_back``) being left out of
    training to judge the new version. Defective ones carry no mask: what a retraining learns from
    them comes through the served abnormal bank; held back, they judge the learned head.

    One that cannot be read any more is skipped with a warning: it is one image among many."""
    train, held = [], []
    for entry in reg.labels(label):
        src = entry["source"]
        path = Path(src)
        try:
            if is_s3(src):
                folder, name = src.rsplit("/", 1)
                path = cache / hashlib.sha256(src.encode()).hexdigest()[:16] / name
                if not path.is_file():
                    open_store(folder).download_file(name, path)  # atomic: temporary file + rename
            elif not path.is_file():
                raise FileNotFoundError("no such file")
        except Exception as e:  # noqa: BLE001 - any storage error: skip this image, keep the rest
            log.warning("skipping the confirmed-%s image %s: %s", label, src, e)
            continue
        side = held if held_back(entry.get("image") or entry["source"], hold_back) else train
        side.append(Sample(path, entry["category"], *((1, "confirmed") if label == "defective" else ())))
    return train, held


def retrain(registry: str, data: str, categories: list[str] | None = None, anomalies_per_class: int = 0,
            workers: int = 0, gpus_per_worker: float = 0.0, ray_address: str | None = None,
            storage: str | None = None, full: bool = False, hold_back: float = 0.0, promote: bool = True,
            settings: list[str] | None = None) -> str:
    """Fit a new version (warm from the current one unless ``full``) and register it; returns its id.

    ``hold_back``: the share of confirmed labels (by a hash of their image) left out, so that the
    new version can be judged on them before it is served; ``promote``: make it current at once
    (else whoever judges it promotes it); ``settings``: ``key=value`` changes to the current config."""
    reg = Registry(registry)
    current = reg.current()
    if current:
        config = ModelConfig.from_dict(json.loads(reg.store.read_text(f"versions/{current}/config.json")))
        served = reg.load(current)
        labels = [(p, f) for p, f in served.confirmed() if not held_back(p.image_id, hold_back)] \
            if isinstance(served, AbnormalMemory) else []
    else:
        config, labels = ModelConfig(), []
    if settings:
        config = config.with_settings(settings)
        full = True  # other settings make another model: nothing to continue from
    def ours(samples: list[Sample]) -> list[Sample]:
        return [s for s in samples if not categories or s.category in categories]

    normals, calibration = map(ours, confirmed_images(reg, "normal", hold_back=hold_back))
    defects = ours(confirmed_images(reg, "defective", hold_back=hold_back)[1])
    base = f"{registry.rstrip('/')}/versions/{current}" if current and not full else None
    log.info("retraining %s from %s (%s, training on %d confirmed annotations and %d images confirmed normal)",
             config.kind, data, f"warm from {current}" if base else f"from scratch, current {current or 'none'}",
             len(labels), len(normals))
    model, stats = train_model(config, data, categories, anomalies_per_class, workers, gpus_per_worker, ray_address,
                               storage or f"{registry.rstrip('/')}/runs", confirmed=labels, normals=normals, base=base,
                               held_back=calibration + defects)
    stats.update(retrained_from=current, carried_annotations=len(labels), confirmed_normals=len(normals),
                 calibrated_on_confirmed_normals=len(calibration), held_back_confirmed_defects=len(defects))
    stats.update(held_back_share=hold_back)
    version = reg.register(model, files={"fit.json": json.dumps(stats, indent=1, default=str)}, make_current=promote)
    log.info("registered %s in %s%s", version, registry, "" if promote else " (not current: to be judged)")
    return version


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m defectloop.workers.retrain", description=__doc__.splitlines()[0])
    p.add_argument("--registry", required=True, help="registry folder or s3://bucket/prefix")
    p.add_argument("--data", required=True, help="image pool in MVTec layout")
    p.add_argument("--categories")
    p.add_argument("--anomalies-per-class", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="Ray Train workers (0: in this process)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--ray-address")
    p.add_argument("--storage", help="Ray Train storage path (default: <registry>/runs)")
    p.add_argument("--full", action="store_true", help="fit every part anew instead of warm from the current version")
    p.add_argument("--hold-back", type=float, default=0.0,
                   help="share of confirmed labels (by image) left out of training, to judge the new version on")
    p.add_argument("--no-promote", action="store_true", help="register the new version without making it current")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a model setting for this retraining (e.g. dmad.steps=3000); fits anew")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cats = [c for c in (args.categories or "").split(",") if c] or None
    try:
        version = retrain(args.registry, args.data, cats, args.anomalies_per_class, args.workers,
                          args.gpus_per_worker, args.ray_address, args.storage, args.full, args.hold_back,
                          promote=not args.no_promote, settings=args.set)
    except Exception as e:
        log.error("retraining failed, the registry is unchanged: %s", e)
        return 1
    print(f"registered {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The retraining job: a new model version from the image pool and the labels gathered so far.

    python -m defectloop.workers.retrain --registry REG --data POOL [--workers N] [--anomalies-per-class K]

Submitted to a Ray cluster by ``defectloop retrain --submit`` (Ray Jobs API) or run by KubeRay's
RayJob (infra/k8s/rayjob-retrain.yaml). It fits with the current version's settings (Ray Train
when --workers is given) and trains on the defects annotators confirmed in the served abnormal
bank as real anomalies (they stay in the new version's bank), then registers it; a run that fails
registers nothing, and the scorer keeps serving the last good version.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from defectloop.memory import AbnormalBank, Provenance
from defectloop.models import ModelConfig
from defectloop.store import Registry
from defectloop.workers.train import train_model

log = logging.getLogger("defectloop.retrain")


def confirmed_labels(bank: AbnormalBank) -> list[tuple[Provenance, torch.Tensor]]:
    """(provenance, features) of entries annotators confirmed (not training masks, not synthetic)."""
    feats, group, provs = bank.tensors()
    return [(p, feats[group == i]) for i, p in enumerate(provs)
            if p.source == "annotation" and not p.annotation_id.startswith("train:")]


def retrain(registry: str, data: str, categories: list[str] | None = None, anomalies_per_class: int = 0,
            workers: int = 0, gpus_per_worker: float = 0.0, ray_address: str | None = None,
            storage: str | None = None) -> str:
    """Fit a new version and register it; returns its id."""
    reg = Registry(registry)
    current = reg.current()
    if current:
        config = ModelConfig.from_dict(json.loads(reg.store.read_text(f"versions/{current}/config.json")))
        labels = confirmed_labels(reg.load(current).abnormal_bank)
    else:
        config, labels = ModelConfig(), []
    log.info("retraining %s from %s (current %s, training on %d confirmed annotations)",
             config.kind, data, current or "none", len(labels))
    model, stats = train_model(config, data, categories, anomalies_per_class, workers, gpus_per_worker, ray_address,
                               storage or f"{registry.rstrip('/')}/runs", confirmed=labels)
    stats.update(retrained_from=current, carried_annotations=len(labels))
    version = reg.register(model, files={"fit.json": json.dumps(stats, indent=1, default=str)})
    log.info("registered %s (%s) in %s", version, reg.label(version), registry)
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cats = [c for c in (args.categories or "").split(",") if c] or None
    try:
        version = retrain(args.registry, args.data, cats, args.anomalies_per_class, args.workers,
                          args.gpus_per_worker, args.ray_address, args.storage)
    except Exception as e:
        log.error("retraining failed, the registry is unchanged: %s", e)
        return 1
    print(f"registered {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ray Train: one unified model fitted by N workers, each on a shard of the images.

Every worker embeds its shard (``images[rank::N]``), keeps its own patch features (raw patches
never travel), and takes part in the fit through ``TorchCollective``: a distributed k-center
coreset (each worker selects twice its share, rank 0 reduces the union), one shared abnormal bank,
the DMAD scorer or CRAD head trained with DistributedDataParallel (gloo), calibration on the
held-back normals of every shard. Rank 0 reports a checkpoint after each phase ("bank", "head",
"final"); a replaced worker restarts from the last one (``FailureConfig``) and skips what it holds.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from defectloop.collective import LOCAL, TorchCollective
from defectloop.data import Sample, load_split
from defectloop.features import extract
from defectloop.models import (
    AnomalyModel,
    Confirmed,
    Fitter,
    ModelConfig,
    choose_tiles,
    create_model,
    load_model,
    tiled,
)
from defectloop.registry import resolve_model_dir
from defectloop.store import S3Config, is_s3

log = logging.getLogger(__name__)

PHASE_FILE = "phase.json"


def _sample_dict(s: Sample) -> dict:
    d = asdict(s)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def _sample(d: dict) -> Sample:
    return Sample(**{**d, "path": Path(d["path"]), "mask_path": Path(d["mask_path"]) if d.get("mask_path") else None})


def arrow_filesystem(location: str | os.PathLike, s3: S3Config | None = None):
    """(path, pyarrow filesystem) for Ray Train's ``storage_path``/``storage_filesystem``, so that
    checkpoints land beside the registry; S3 gets the same endpoint and credentials as boto3."""
    if not is_s3(location):
        return str(Path(location).resolve()), None
    import boto3
    from pyarrow import fs

    c = s3 or S3Config.from_env()
    creds = boto3.Session(aws_access_key_id=c.access_key, aws_secret_access_key=c.secret_key).get_credentials()
    endpoint = c.endpoint_url or ""
    filesystem = fs.S3FileSystem(
        access_key=creds.access_key if creds else None, secret_key=creds.secret_key if creds else None,
        session_token=creds.token if creds else None, region=c.region or "us-east-1",
        endpoint_override=endpoint.split("://", 1)[-1] or None,
        scheme="http" if endpoint.startswith("http://") else "https", force_virtual_addressing=False)
    return str(location)[5:].rstrip("/"), filesystem


def train_loop(config: dict) -> None:
    """What each Ray Train worker runs."""
    import ray.train
    from ray.train import Checkpoint

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    comm = TorchCollective() if world > 1 else LOCAL
    torch.set_num_threads(config["threads"])
    model = create_model(ModelConfig.from_dict(config["model"]))
    device = ray.train.torch.get_device() if config["gpus"] else torch.device("cpu")
    done: frozenset[str] = frozenset()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model.load_state(Path(d))
            done = frozenset(json.loads((Path(d) / PHASE_FILE).read_text())["done"])
        log.info("worker %d: resuming after %s", rank, sorted(done))
    elif config["base"]:
        model.load_state(resolve_model_dir(config["base"]))

    samples = tiled([_sample(x) for x in config["samples"]][rank::world], model.config)  # an image's tiles on one worker
    t0 = time.perf_counter()
    train = extract(model.embedder.to(device), samples, model.config.image_size, device=device,
                    progress=f"worker {rank}: features" if rank == 0 else False)
    model.embedder.to("cpu")
    extract_s = time.perf_counter() - t0
    phases = set(done)

    def report(phase: str, stats: dict | None = None) -> None:
        phases.add(phase)
        metrics = {"phase": phase, "resumed_after": sorted(done), "extract_s": extract_s,
                   "n_images": len(samples), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            model.save(d, partial=phase != "final")
            (Path(d) / PHASE_FILE).write_text(json.dumps({"done": sorted(phases)}))
            if stats is not None:
                (Path(d) / "fit.json").write_text(json.dumps(stats, indent=1, default=str))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))

    t1 = time.perf_counter()
    stats = Fitter(model).fit(train, progress=rank == 0, comm=comm, checkpoint=report, done=done,
                              confirmed=config["confirmed"], warm=bool(config["base"]),
                              calibration_only=config["calibration_only"])
    workers = comm.all_gather({"rank": rank, "n_images": len(samples), "extract_s": extract_s,
                               "images_per_s": len(samples) / max(extract_s, 1e-9),
                               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    stats.update({"fit_s": time.perf_counter() - t1, "per_worker": workers, "resumed_after": sorted(done)})
    report("final", stats)


def fit_distributed(config: ModelConfig, samples: list[Sample], workers: int, gpus_per_worker: float = 0.0,
                    ray_address: str | None = None, storage: str | None = None, name: str | None = None,
                    max_failures: int = 2, confirmed: Confirmed = (), base: str | None = None,
                    calibration_only: Sequence[str] = ()) -> tuple[AnomalyModel, dict]:
    """Fit one model on ``workers`` Ray Train workers; returns it with its fit statistics.

    ``base``: a model version every worker can read (folder or s3:// URI) to fit warm from.

    Raises ``ray.train.TrainingFailedError`` when the run fails for good: nothing is registered.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, logging_level=logging.WARNING)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    per_worker = max(1, cpus // workers)
    path, fs = arrow_filesystem(storage or Path(tempfile.gettempdir()) / "defectloop-ray-runs")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"model": config.to_dict(), "samples": [_sample_dict(s) for s in samples],
                           "threads": per_worker, "gpus": gpus_per_worker > 0, "confirmed": list(confirmed),
                           "base": base, "calibration_only": list(calibration_only)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                     resources_per_worker={"CPU": per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}),
        torch_config=TorchConfig(backend="gloo"),  # collectives on CPU tensors, GPUs or not
        run_config=RunConfig(name=name or f"defectloop-{config.kind}-{int(time.time())}", storage_path=path,
                             storage_filesystem=fs, failure_config=FailureConfig(max_failures=max_failures)))
    try:
        result = trainer.fit()
    except Exception as e:  # ray.train.TrainingFailedError: out of retries
        raise RuntimeError(f"training failed on the Ray workers: {e}") from e
    with result.checkpoint.as_directory() as d:
        folder = Path(d)
        if (folder / "PARTIAL").exists():
            raise RuntimeError("the training run ended without a final checkpoint")
        model = load_model(folder)
        stats = json.loads((folder / "fit.json").read_text())
    stats["run_path"] = result.path
    return model, stats


def train_model(config: ModelConfig, data: str, categories: list[str] | None, anomalies_per_class: int, workers: int,
                gpus_per_worker: float = 0.0, ray_address: str | None = None, storage: str | None = None,
                progress: bool = True, max_failures: int = 2, confirmed: Confirmed = (),
                normals: Sequence[Sample] = (), base: str | None = None,
                held_back: Sequence[Sample] = ()) -> tuple[AnomalyModel, dict]:
    """Fit a model on the train split of ``data``, plus annotators' ``confirmed`` defects and the
    ``normals`` they confirmed: in this process (workers = 0) or on Ray Train workers.
    ``held_back``: confirmed labels kept out of fitting: the thresholds are set on the normals too,
    and with the defects (no masks) they judge a learned head (models/head_choice.py).

    ``base`` (a model version's folder or s3:// URI, of the same config) makes it a warm fit from
    that version (see ``AnomalyModel.fit``); without it every part is fitted anew."""
    split = load_split(data, categories, anomalies_per_class, config.seed)
    split.train.extend([*normals, *held_back])
    held = [s.image_id for s in held_back if s.label == 0]
    for note in split.notes:
        log.info(note)
    t0 = time.perf_counter()
    config = choose_tiles(config, split.train)
    if workers:
        model, stats = fit_distributed(config, split.train, workers, gpus_per_worker, ray_address, storage,
                                       max_failures=max_failures, confirmed=confirmed, base=base,
                                       calibration_only=held)
    else:
        model = create_model(config)
        if base:
            model.load_state(resolve_model_dir(base))
        train = extract(model.embedder, tiled(split.train, config), config.image_size,
                        progress="features" if progress else False)
        extract_s = time.perf_counter() - t0
        stats = Fitter(model).fit(train, progress=progress, confirmed=confirmed, warm=bool(base), calibration_only=held)
        stats.update(fit_s=time.perf_counter() - t0 - extract_s, per_worker=[{
            "rank": 0, "n_images": len(split.train), "extract_s": extract_s,
            "images_per_s": len(split.train) / max(extract_s, 1e-9),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}])
    stats.update(fit_seconds=time.perf_counter() - t0, categories=split.categories, notes=split.notes)
    return model, stats

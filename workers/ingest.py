"""Pool ingestion on Ray Data: every image of a pool embedded once, by backbone actors, into the
feature cache (``features/cache.py``).

    image sources (a folder, an S3 prefix, a list) -> Ray Data -> map_batches(_Embed actors) -> FeatureCache

Each actor loads the backbone once and takes batches of image sources; it reads and hashes every
image, and embeds only those whose hash the cache does not hold yet, so an ingestion that crashed
is started again at the cost of reading what it had done, not embedding it. Actors spread over
the cluster's nodes like any Ray Data stage (``concurrency`` of them, ``num_cpus`` each). What
comes back to the driver is one small row per image: its source, content hash, size, whether this
run embedded it, and the node that did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defectloop.data.tiles import Grid
from defectloop.features.cache import FeatureCache, content_hash
from defectloop.labeling.workspace import pool_images
from defectloop.models import ModelConfig
from defectloop.store import is_s3, read_uri

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ingested:
    source: str
    digest: str  # sha256 of the image file ("" when it could not be read)
    size: tuple[int, int]  # (width, height) of the original image
    embedded: bool  # by this run (False: the cache had it)
    node: str  # the Ray node that read it
    error: str = ""  # why it could not be read or embedded


def pool_sources(location: str) -> list[str]:
    """The images of a pool folder or ``s3://`` prefix (paths or URIs), as ``label init`` lists them."""
    return [p.uri for p in pool_images(location)]


class _Embed:
    """A Ray Data actor: the backbone, loaded once, and the cache it writes to."""

    def __init__(self, config: dict, cache: str, threads: int, roots: list[str]):
        import ray
        import torch

        from defectloop.features import PatchEmbedder, load_backbone

        torch.set_num_threads(threads)
        self.config = ModelConfig.from_dict(config)
        self.embedder = PatchEmbedder(load_backbone(self.config.backbone, self.config.backbone_checkpoint))
        c = self.config
        self.cache = FeatureCache.open(cache, c.backbone, c.backbone_checkpoint, c.image_size)
        self.node = ray.get_runtime_context().get_node_id()
        self.roots = roots  # local sources are read below these folders only, as regular files

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from defectloop.data import read_image
        from defectloop.features import tile_tensors

        rows = []  # (source, digest, width, height, embedded, error)
        todo: list[tuple[int, Grid, torch.Tensor]] = []  # (row, its grid, the inputs of the image's tiles)
        for source, category in zip(batch["source"].tolist(), batch["category"].tolist(), strict=True):
            try:
                grid = self.config.grid(category)
                data = read_uri(source, self.roots)
                digest = content_hash(data)
                hit = self.cache.find(digest, grid)
                if hit is not None:
                    rows.append([source, digest, *hit.size, False, ""])
                    continue
                img, (w, h) = read_image(data, self.config.read_size(category))
                todo.append((len(rows), grid, tile_tensors(img, self.config.tiling(category), self.config.image_size)))
                rows.append([source, digest, w, h, True, ""])
            except Exception as e:  # an unreadable image is reported, the rest go on
                rows.append([source, "", 0, 0, False, f"{type(e).__name__}: {e}"])
        if todo:
            with torch.no_grad():
                feats = self.embedder(torch.cat([t for *_, t in todo])).float().split([len(t) for *_, t in todo])
            for (i, grid, t), f in zip(todo, feats, strict=True):
                self.cache.put(rows[i][1], f if len(t) > 1 else f[0], (rows[i][2], rows[i][3]), grid)
        cols = list(zip(*rows, strict=True))
        return {"source": np.array(cols[0], dtype=object), "digest": np.array(cols[1], dtype=object),
                "width": np.array(cols[2]), "height": np.array(cols[3]), "embedded": np.array(cols[4]),
                "error": np.array(cols[5], dtype=object), "node": np.array([self.node] * len(rows), dtype=object)}


def ingest(sources: list[str], cache: str, config: ModelConfig, concurrency: int | None = None,
           batch_size: int = 16, num_cpus: float = 1.0, ray_address: str | None = None,
           roots: list[str] | None = None, categories: list[str] | None = None) -> list[Ingested]:
    """Embed every source (a path or an ``s3://`` URI) the cache does not hold yet, with
    ``concurrency`` backbone actors (default: one per ``num_cpus`` of the cluster's CPUs); returns
    one row per source, in order. ``roots``: the folders local sources may be read below (default:
    each source's own folder). ``categories`` (one per source): each image is embedded as the
    tiles ``config`` sees its category as (``ModelConfig.tiles``; one tile without)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, logging_level=logging.WARNING)
    if not sources:
        return []
    if concurrency is None:
        concurrency = max(1, int(ray.cluster_resources().get("CPU", 1) // num_cpus))
    blocks = min(len(sources), max(concurrency * 4, -(-len(sources) // (batch_size * 4))))
    cats = categories or [""] * len(sources)
    ds = ray.data.from_items([{"source": s, "category": c} for s, c in zip(sources, cats, strict=True)],
                             override_num_blocks=blocks)
    roots = roots if roots is not None else sorted({str(Path(s).parent) for s in sources if not is_s3(s)})
    out = ds.map_batches(_Embed, fn_constructor_args=(config.to_dict(), cache, max(1, int(num_cpus)), roots),
                         batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=num_cpus,
                         batch_format="numpy")
    rows = {r["source"]: r for r in out.iter_rows()}
    result = [Ingested(s, r["digest"], (int(r["width"]), int(r["height"])), bool(r["embedded"]), r["node"], r["error"])
              for s in sources for r in [rows[s]]]
    failed = [r for r in result if r.error]
    for r in failed[:10]:
        log.warning("%s: not ingested (%s)", r.source, r.error)
    log.info("ingested %d images: %d embedded, %d from the cache, %d unreadable", len(result),
             sum(r.embedded for r in result), sum(not r.embedded and not r.error for r in result), len(failed))
    return result

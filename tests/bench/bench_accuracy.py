"""Accuracy, speed and coreset benchmark on real inspection images (run on demand, not in CI).

    .venv/bin/python tests/bench/bench_accuracy.py [--data ../shared/data/dev] [--json OUT]

One unified model over all categories of --data. PatchCore, DMAD unsupervised, DMAD with 1, 5
and 10 annotated anomalies per category, CRAD and its ablations (no global grid, no coordinate
jitter, with the refinement blend) share one backbone, one seed and one test set (the test
images left after removing the 10 seen anomalies per category; seen(1) and seen(5) are subsets
of seen(10)). Each mode's served masks are scored by IoU with the defects' (``mask_iou``), and again
once ``--mask-labels`` confirmed masks per category set the mask edges as the loop does. Each
category is seen as the tiles a fit chooses for it (``--tiles auto``; ``none``: every image whole,
as before tiles; or given by hand), shared by every mode. Also measured in the same run: scoring
throughput vs the bare backbone in tiles/s at the model's input size (``--image-size``, 256 px by
default), batches of 16 tiles (as the product runs it, and as loaded), and the coreset against
the plain greedy k-center loop. ``--categories`` keeps a subset.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from defectloop.data import load_split
from defectloop.data.images import load_mask
from defectloop.data.tiles import firsts, image_grids
from defectloop.evaluation import evaluate_extracted
from defectloop.features import Extracted, PatchEmbedder, extract, image_tensor, load_backbone
from defectloop.labeling.feedback import cells_at, encode_cells
from defectloop.memory.coreset import KCenterGreedy, coverage_radius, farthest_points, random_projection
from defectloop.metrics import fmt, served_mask_ious
from defectloop.models import CRADConfig, Fitter, ModelConfig, choose_tiles, create_model, tiled
from defectloop.precision import matmul_dtype

ROOT = Path(__file__).resolve().parents[2]


def subset(ex: Extracted, keep) -> Extracted:
    idx = [i for i, s in enumerate(ex.samples) if keep(s)]
    return Extracted(ex.features[idx], [ex.samples[i] for i in idx], [ex.masks[i] for i in idx], ex.skipped)


def throughput(embedder: PatchEmbedder, stock_backbone: torch.nn.Module, fitted: dict, rows: list, size: int,
               rounds: int) -> dict:
    """Tiles/s of each fitted model's scorer (embedding + search + head + stitched maps: an image's
    tiles scored together, as ``score_images`` does) against the bare backbone's, on the same tiles
    embedded in batches of 16, both as the product runs it (batch norms folded, channels-last) and
    as loaded (the stock timm/torchvision forward). Rounds alternate among them and each keeps its
    best round, so that the machine's load (the backbone alone varied from 20 to 104 img/s between
    runs) hits all alike."""
    inputs = torch.stack([image_tensor(s.read(), size) for s in rows])
    grids = image_grids(rows)

    def embedded(net) -> list:
        return [net(inputs[i:i + 16]) for i in range(0, len(inputs), 16)]

    runs = {"backbone": lambda: embedded(embedder.backbone), "backbone_as_loaded": lambda: embedded(stock_backbone),
            **{n: (lambda m=fitted[n]: m.score_images(torch.cat(embedded(m.embedder)).float(), grids)) for n in fitted}}
    best = dict.fromkeys(runs, float("inf"))
    with torch.no_grad():
        for fn in runs.values():
            fn()
        for _ in range(rounds):
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t)
    n, images = len(rows), len(grids)
    bb, stock = n / best["backbone"], n / best["backbone_as_loaded"]
    out = {"tiles": n, "images": images, "backbone_img_s": bb, "backbone_as_loaded_img_s": stock}
    print(f"{n} tiles of {images} images: backbone {bb:.1f} tiles/s, as loaded {stock:.1f} tiles/s", flush=True)
    for name in fitted:
        r = n / best[name]
        out.update({f"{name}_img_s": r, f"{name}_ratio": r / bb, f"{name}_ratio_as_loaded": r / stock})
        print(f"  {name}: {r:.1f} tiles/s = {r / bb:.2f}x the backbone, {r / stock:.2f}x as loaded", flush=True)
    return out


def mask_edges(model, samples: list, scores: torch.Tensor, maps: list[torch.Tensor], k: int, seed: int,
               draws: int = 10) -> dict:
    """Served mask IoU per category once ``k`` confirmed masks per category set the mask edges, as
    the loop sets them (the masks kept as ledger cells, ``Calibration.with_mask_levels``), against
    the fitted cut: both on the test defects that did not teach the edges, averaged over ``draws``
    draws of the teaching masks. ``all``: over those defects (one called normal shows no mask:
    IoU 0); ``shown``: over those called anomalous, whose mask an annotator sees. Test images are
    not in the model's memory, so their maps are what the loop's are without their own masks.
    ``samples``, ``scores``, ``maps``: per test image (tiles stitched)."""
    cats = [s.category for s in samples]
    by_cat: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        if s.label and s.mask_path is not None:
            by_cat.setdefault(s.category, []).append(i)
    cells = {i: encode_cells(load_mask(samples[i].mask_path)) for idx in by_cat.values() for i in idx}
    rng = random.Random(seed)
    out: dict = {c: {"levels": []} for c in by_cat}
    for _ in range(draws):
        taught = [i for _, idx in sorted(by_cat.items()) for i in rng.sample(idx, min(k, len(idx)))]
        masks = [cells_at([cells[i]], tuple(maps[i].shape[-2:]))[0] for i in taught]
        edges = model.calibration.with_mask_levels([cats[i] for i in taught], [maps[i] for i in taught], masks)
        rest = [i for i in range(len(cats)) if i not in set(taught)]
        for c in by_cat:
            out[c]["levels"].append(edges.get(c).mask_level)
        for name, cal in (("fitted", model.calibration), ("edges", edges)):
            shown = model.post.predictions(scores[rest], [maps[i] for i in rest], [cats[i] for i in rest], cal)
            for i, p, iou in zip(rest, shown, served_mask_ious(shown, [samples[i] for i in rest]), strict=True):
                if iou is not None:
                    out[cats[i]].setdefault(f"{name}_all", []).append(iou)
                    if p.decision == "anomalous":
                        out[cats[i]].setdefault(f"{name}_shown", []).append(iou)
    return {c: {n: (v if n == "levels" else sum(v) / len(v)) for n, v in r.items()} for c, r in out.items()}


def naive_kcenter(x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """The plain greedy loop (PatchCore/anomalib): a full distance pass for every selected centre."""
    first = int(torch.randint(x.shape[0], (1,), generator=torch.Generator().manual_seed(seed)))
    sel = [first]
    mind = torch.linalg.norm(x - x[first], dim=1)
    for _ in range(1, n):
        i = int(mind.argmax())
        sel.append(i)
        mind = torch.minimum(mind, torch.linalg.norm(x - x[i], dim=1))
    return torch.tensor(sel)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "dev"))
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--cache", default="/tmp/defectloop-bench-features.pt", help="features file (per image size "
                    "and categories: the size and the categories are added to its name)")
    ap.add_argument("--image-size", type=int, default=ModelConfig.image_size,
                    help="model input side in px (native resolution: e.g. 512 for the dev screw images)")
    ap.add_argument("--categories", default=None, help="comma-separated subset of the categories of --data")
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="patchcore,dmad-unsup,dmad-1,dmad-5,dmad-10,crad,"
                    "crad-no-global,crad-no-jitter,crad-refine,crad-one-stats", help="comma-separated subset")
    ap.add_argument("--throughput-rounds", type=int, default=5)
    ap.add_argument("--mask-labels", type=int, default=5, help="confirmed masks per category that set the mask "
                    "edges (the rest of the test defects measure them); 0: skip")
    ap.add_argument("--crad-epochs", type=int, default=None, help="shorter CRAD runs, e.g. for the ablations")
    ap.add_argument("--tiles", default="auto", help="the grid of tiles per category: auto (chosen on the training "
                    "images, as a fit chooses them), none (every image whole), or JSON, e.g. '{\"screw\": [3, 3]}'")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    out: dict = {"modes": {}, "image_size": args.image_size}

    cats = args.categories.split(",") if args.categories else None
    full = load_split(args.data, cats, anomalies_per_class=10, seed=args.seed)
    base = load_split(args.data, cats, anomalies_per_class=0, seed=args.seed)
    test_paths = {s.path for s in full.test}
    embedder = PatchEmbedder(load_backbone(args.backbone))
    config = ModelConfig(seed=args.seed, backbone=args.backbone, image_size=args.image_size)
    t = time.perf_counter()
    if args.tiles == "auto":
        config = choose_tiles(config, base.train, embedder)
        out["tile_choice_s"] = time.perf_counter() - t
    else:
        config = replace(config, tiles={} if args.tiles == "none" else json.loads(args.tiles))
    out["tiles"] = config.tiles
    print(f"tiles (rows, cols): {config.tiles or 'none'}", flush=True)
    cache = Path(args.cache)
    named = "-".join(f"{c}{g.key}" for c, g in sorted(config.tiles.items()) if g.count > 1)
    if args.image_size != ModelConfig.image_size or cats or named:
        cache = cache.with_name(f"{cache.stem}-{args.image_size}{'-' + '-'.join(cats) if cats else ''}"
                                f"{'-tiles-' + named if named else ''}{cache.suffix}")
    if cache.exists():
        every = Extracted(**torch.load(cache, weights_only=False))
    else:
        t = time.perf_counter()
        every = extract(embedder, tiled(base.train + base.test, config), args.image_size, progress="features (all images)")
        out["extract_s"] = time.perf_counter() - t
        torch.save(vars(every), cache)
    test = subset(every, lambda s: s.path in test_paths)
    print(f"{len(every.samples)} tiles, test set {len(test.samples)}; notes: {full.notes}", flush=True)

    modes = {"patchcore": ("patchcore", 0, {}), "dmad-unsup": ("dmad", 0, {}), "dmad-1": ("dmad", 1, {}),
             "dmad-5": ("dmad", 5, {}), "dmad-10": ("dmad", 10, {}), "crad": ("crad", 0, {}),
             "crad-no-global": ("crad", 0, {"use_global": False}), "crad-no-jitter": ("crad", 0, {"jitter": 0.0}),
             "crad-refine": ("crad", 0, {"refine": True}), "crad-one-stats": ("crad", 0, {"clusters": 1})}
    fitted = {}
    for name in args.modes.split(","):
        kind, k, extra = modes[name]
        if kind == "crad" and args.crad_epochs:
            extra = {**extra, "epochs": args.crad_epochs}
        split = load_split(args.data, cats, anomalies_per_class=k, seed=args.seed)
        train_paths = {s.path for s in split.train}
        train = subset(every, lambda s, tp=train_paths: s.path in tp)
        model = create_model(replace(config, kind=kind, crad=CRADConfig(**extra)))
        t = time.perf_counter()
        stats = Fitter(model).fit(train, progress=True)
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        done = evaluate_extracted(model, test)
        res, samples, scores, maps = done.result, done.samples, done.scores, done.maps
        score_s = time.perf_counter() - t
        res.update(fit_s=fit_s, head_tiles_per_s=len(test.samples) / score_s,
                   fit={k: v for k, v in stats.items() if k != "crad_history"})
        if args.mask_labels:
            res["mask_edges"] = mask_edges(model, samples, scores, maps, args.mask_labels, args.seed)
        out["modes"][name] = res
        fitted[name] = model
        print(f"{name:11s} fit {fit_s:6.1f}s  " + "  ".join(
            f"{c}: {fmt(m['image_auroc'])}/{fmt(m['pixel_auroc'])}/{fmt(m['aupro'])}/IoU {fmt(m['mask_iou'])}"
            for c, m in [*res["categories"].items(), ("mean", res["mean"])]), flush=True)
        if args.mask_labels:
            print(f"{'':11s} mask IoU shown / all, fitted cut -> edges from {args.mask_labels} masks: " + ", ".join(
                f"{c} {fmt(v['fitted_shown'])}/{fmt(v['fitted_all'])} -> {fmt(v['edges_shown'])}/{fmt(v['edges_all'])}"
                for c, v in res["mask_edges"].items()), flush=True)
        if "heads" in stats:  # DMAD: which score serves each category, judged on held-back labels
            print(f"{'':11s} scored by: " + ", ".join(f"{c} {v['serves']}" for c, v in stats["heads"]["categories"].items()),
                  flush=True)

    # throughput at the input size, on the tiles of 16 test images (a stride through the test set, so
    # that categories mix as there) and, where a category is tiled, of 4 of its images alone
    starts = firsts([s.parent_id for s in test.samples])
    mix = [test.samples[i].parent_id for i in starts[::max(1, len(starts) // 16)][:16]]
    tiled_ids = [test.samples[i].parent_id for i in starts if config.grid(test.samples[i].category).count > 1]
    out["throughput"] = {"matmul_dtype": str(matmul_dtype())}
    print(f"scoring products in {matmul_dtype()}", flush=True)
    stock_backbone = load_backbone(args.backbone, fast=False)
    for name, images in (("test mix", mix), ("tiled images", tiled_ids[::max(1, len(tiled_ids) // 4)][:4])):
        if images:
            print(f"throughput, {name}:", flush=True)
            out["throughput"][name] = throughput(embedder, stock_backbone, fitted,
                                                 [s for s in test.samples if s.parent_id in set(images)],
                                                 args.image_size, args.throughput_rounds)

    # coreset: 51k patches (50 images of one category at 256 px, fewer at a larger size), 10% and 1%,
    # ours vs the plain greedy loop
    cat = test.samples[0].category
    per_image = every.features.shape[2] * every.features.shape[3]
    imgs = [i for i, s in enumerate(every.samples) if s.category == cat and s.label == 0][:max(1, 51200 // per_image)]
    flat = every.features[imgs].permute(0, 2, 3, 1).reshape(-1, every.features.shape[1])
    x = random_projection(flat, 128, args.seed)
    out["coreset"] = {"n_patches": int(flat.shape[0])}
    for ratio in (0.1, 0.01):
        n = int(flat.shape[0] * ratio)
        t = time.perf_counter()
        ours = farthest_points(x, n, args.seed)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        plain = naive_kcenter(x, n, args.seed)
        t_plain = time.perf_counter() - t
        same = float((ours == plain).float().mean())
        r_ours = coverage_radius(flat, flat[ours])
        out["coreset"][str(ratio)] = {"ours_s": t_ours, "plain_s": t_plain, "speedup": t_plain / t_ours,
                                      "patches_per_s": flat.shape[0] / t_ours, "same_selection": same,
                                      "coverage_radius": r_ours}
        print(f"coreset {ratio:.0%} of {flat.shape[0]}: ours {t_ours:.2f}s, plain loop {t_plain:.2f}s "
              f"({t_plain / t_ours:.1f}x), identical selection {same:.3f}", flush=True)
    # a million patches: all normal images of the unified set, 1% (sharded k-center, as in fit)
    allflat = every.features[[i for i, s in enumerate(every.samples) if s.label == 0]]
    allflat = allflat.permute(0, 2, 3, 1).reshape(-1, allflat.shape[1])
    t = time.perf_counter()
    KCenterGreedy(seed=args.seed).select(allflat, int(allflat.shape[0] * 0.01))
    t_all = time.perf_counter() - t
    out["coreset"]["unified_1pct"] = {"n_patches": int(allflat.shape[0]), "s": t_all,
                                      "patches_per_s": allflat.shape[0] / t_all}
    print(f"coreset 1% of {allflat.shape[0]} patches: {t_all:.1f}s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())

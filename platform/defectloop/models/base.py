"""What every anomaly model shares: config, normal bank, calibration, post-processing, save/load.

A model version is a directory: ``config.json``, ``weights.safetensors`` (learned parts, if any),
``normal_bank.*``, ``abnormal_bank.*``, ``calibration.json`` and, once evaluated, ``metrics.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from defectloop.collective import LOCAL, Collective
from defectloop.features import Extracted, PatchEmbedder, load_backbone
from defectloop.memory import (
    AbnormalBank,
    KCenterGreedy,
    NormalBank,
    Provenance,
    extend_farthest,
    target_size,
)

log = logging.getLogger(__name__)

#: the key of the threshold used for images of a category the model has not seen
ANY_CATEGORY = "*"

#: annotators' confirmed defects: (provenance, patch features under the mask) per annotation
Confirmed = Sequence[tuple[Provenance, torch.Tensor]]


@dataclass
class ModelConfig:
    """Everything that defines a model; saved as config.json in each version."""

    kind: str = "dmad"
    backbone: str = "tf_efficientnet_lite0"
    backbone_checkpoint: str | None = None
    image_size: int = 256
    seed: int = 0
    coreset_ratio: float = 0.05  # fraction of normal patches kept in the normal bank
    coreset_max: int = 100_000
    holdout_fraction: float = 0.1  # normal training images held back for threshold calibration
    threshold_quantile: float = 0.99
    smoothing_sigma: float = 4.0  # Gaussian on the anomaly map, in pixels at 256 px
    # DMAD
    mask_coverage: float = 0.25  # a patch is abnormal when this fraction of its cell is defective
    hidden: int = 256
    heads: int = 3  # DMAD correction heads averaged (one head's ranking swings with its seed)
    steps: int = 1500
    batch_size: int = 1024
    lr: float = 1e-3
    real_weight: float = 5.0
    synthetic_weight: float = 1.0
    synthetic_per_category: int = 8
    train_patches: int = 100_000
    # CRAD
    crad_epochs: int = 40
    crad_patience: int = 8  # epochs without a better held-back loss before stopping
    crad_batch_size: int = 16
    crad_grid_lr: float = 0.1
    crad_weight_decay: float = 0.01
    crad_layers: int = 2  # 4 cost 1.5x the fit time for no better pixel AUROC (models/crad.py)
    crad_width: int = 0  # fusion channels; 0 = the backbone's patch dimension
    crad_expansion: int = 2
    crad_local_res: int = 16
    crad_global_res: int = 4
    crad_global: bool = True
    crad_refine: bool = False  # the similarity blend; off: it cost 10 points of pixel AUROC (README)
    crad_jitter: float = 0.05
    crad_clusters: int = 0  # feature statistics per cluster of images: 0 = chosen by silhouette, 1 = one set
    crad_bf16: bool = True  # bfloat16 autocast while training the head
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)


def map_operator(n: int, size: int, sigma: float) -> torch.Tensor:
    """size x n matrix of "bilinear upsampling from n to size, then Gaussian smoothing" along one axis.

    Both steps are linear and separable, so a whole anomaly map is ``A_h @ patch_map @ A_w.T``:
    two small GEMMs instead of a 256 x 256 upsampling plus two 33-tap convolutions (~15x faster
    on CPU). Smoothing uses reflect padding and a kernel truncated at 4 sigma.
    """
    eye = torch.eye(n)[:, None]
    up = F.interpolate(eye, size=size, mode="linear", align_corners=False)  # n x 1 x size: rows = U.T
    if sigma > 0:
        radius = min(max(1, int(math.ceil(4 * sigma))), size - 1)
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k = torch.exp(-(x**2) / (2 * sigma**2))
        up = F.conv1d(F.pad(up, (radius, radius), mode="reflect"), (k / k.sum()).view(1, 1, -1))
    return up[:, 0].T.contiguous()


def split_holdout(samples: list, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of (fit, held-back) normal samples.

    An image is held back when a seeded hash of its id falls below ``fraction``, so its side never
    changes when images are added: a warm retraining must not calibrate on images whose patches
    its bank already holds. Per category with two images or more, at least one is held back and
    at least one fitted (the lowest and highest hash).
    """
    by_cat: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        if s.label == 0:
            by_cat.setdefault(s.category, []).append(i)
    fit, held = [], []
    for _, idx in sorted(by_cat.items()):
        u = {i: int(hashlib.sha256(f"{seed}/holdout/{samples[i].image_id}".encode()).hexdigest()[:12], 16) / 16**12
             for i in idx}
        out = {i for i in idx if u[i] < fraction}
        if fraction > 0 and len(idx) > 1 and not out:
            out = {min(idx, key=u.__getitem__)}
        elif len(out) == len(idx):
            out.discard(max(idx, key=u.__getitem__))
        held += sorted(out)
        fit += [i for i in idx if i not in out]
    return sorted(fit), sorted(held)


class AnomalyModel(nn.Module):
    """Base class: frozen embedder + normal bank; subclasses define ``patch_scores``."""

    kind = "base"
    #: whether the model keeps a discrete normal bank (CRAD's memory is its learned grids)
    uses_normal_bank = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedder = PatchEmbedder(load_backbone(config.backbone, config.backbone_checkpoint))
        self.dim = self.embedder.dim
        self.normal_bank: NormalBank | None = None
        self.abnormal_bank = AbnormalBank(self.dim)
        self.calibration: dict[str, dict[str, float]] = {}
        self.fitted = False

    # ----- fitting -------------------------------------------------------------------------
    def fit(self, train: Extracted, progress: bool = False, comm: Collective = LOCAL,
            checkpoint: Callable[[str], None] | None = None, done: frozenset[str] = frozenset(),
            confirmed: Confirmed = (), warm: bool = False) -> dict:
        """Build the normal bank, fit learned parts, calibrate thresholds on held-back normals.

        ``warm`` (a retraining from the served version, loaded into this model) keeps what was
        learned: the normal bank only gains entries from images it has not seen, and learned heads
        continue from their weights and input statistics. A cold fit draws everything anew, and
        with a new draw of bank and head a model's ranking can swing more than a round of labels
        moves it (measured in the dev demo: screw image AUROC 91.2 -> 82.2 and 76.6 after cold
        retrainings that added 23 confirmed defects, or 6, and a few dozen normal images).

        With ``comm`` of world > 1, ``train`` is this worker's shard and the workers agree through
        ``comm``. ``checkpoint(phase)`` is called after the "bank" and "head" phases; phases in
        ``done`` were restored from a checkpoint and are skipped. ``confirmed`` (the same on every
        worker) are defects annotators confirmed on pool images: they end up in the abnormal bank,
        and a learned head trains on them as real anomalies.
        """
        if warm and self.uses_normal_bank and self.normal_bank is None:
            raise ValueError("a warm fit continues a fitted model: load one first")
        torch.manual_seed(self.config.seed + comm.rank)
        fit_idx, held_idx = split_holdout(train.samples, self.config.holdout_fraction, self.config.seed)
        if min(comm.all_gather(len(fit_idx))) == 0:
            raise ValueError("no normal training image to fit on" if comm.world == 1 else
                             "a worker's shard has no normal training image: use fewer workers")
        stats = {"warm": warm, "n_train_images": int(comm.all_sum(len(train.samples))), "n_fit_normal": int(comm.all_sum(len(fit_idx))),
                 "n_calibration": int(comm.all_sum(len(held_idx))),
                 "skipped": [x for part in comm.all_gather(train.skipped) for x in part], "workers": comm.world}
        if self.uses_normal_bank and "bank" not in done:
            build = self.extend_normal_bank if warm else self.build_normal_bank
            stats.update(build(train, fit_idx, progress, comm))
            if checkpoint:
                checkpoint("bank")
        if "head" not in done:
            stats.update(self.fit_head(train, fit_idx, progress, comm, confirmed, warm))
            for prov, cells in confirmed:  # heads that do not train on them still score with them
                if prov.annotation_id not in self.abnormal_bank:
                    self.abnormal_bank.add(prov, cells)
            stats["confirmed_annotations"] = len(confirmed)
            if checkpoint:
                checkpoint("head")
        cats, scores, peaks = [train.samples[i].category for i in held_idx], torch.zeros(0), torch.zeros(0)
        if held_idx:
            scores, maps = self.score_features(train.features[held_idx])
            peaks = maps.flatten(1).max(1).values
        parts = comm.all_gather((cats, scores, peaks))
        if any(p[0] for p in parts):
            self.calibrate([c for p in parts for c in p[0]], torch.cat([p[1] for p in parts]),
                           torch.cat([p[2] for p in parts]))
        self.fitted = True
        return stats

    def build_normal_bank(self, train: Extracted, fit_idx: list[int], progress: bool = False,
                          comm: Collective = LOCAL) -> dict:
        """Greedy k-center coreset of the fit images' patches.

        Distributed: each worker selects twice its share from its own patches, and one worker
        reduces the union to the final size (raw patches never leave their worker).
        """
        feats = train.features[fit_idx]  # n x C x H x W
        n, c, h, w = feats.shape
        flat = feats.permute(0, 2, 3, 1).reshape(-1, c)
        owners = torch.arange(n).repeat_interleave(h * w)
        image_ids = [train.samples[i].image_id for i in fit_idx]
        total = int(comm.all_sum(flat.shape[0]))
        size = target_size(total, self.config.coreset_ratio, self.config.coreset_max)
        if progress:
            tqdm.write(f"coreset: selecting {size} of {total} patches" + (f" on {comm.world} workers" if comm.world > 1 else ""))
        if comm.world == 1:
            sel = KCenterGreedy(seed=self.config.seed).select(flat, size)
            self.normal_bank = NormalBank(flat[sel].clone(), image_ids, owners[sel])
        else:
            share = min(flat.shape[0], math.ceil(2 * size * flat.shape[0] / total))
            sel = KCenterGreedy(seed=self.config.seed + comm.rank).select(flat, share)
            parts = comm.all_gather((flat[sel].clone(), [image_ids[o] for o in owners[sel].tolist()]))
            bank = None
            if comm.rank == 0:
                union = torch.cat([p[0] for p in parts])
                entry_ids = [x for p in parts for x in p[1]]
                final = KCenterGreedy(seed=self.config.seed).select(union, min(size, union.shape[0]))
                distinct = sorted({entry_ids[i] for i in final.tolist()})
                pos = {x: i for i, x in enumerate(distinct)}
                bank = (union[final].clone(), distinct, torch.tensor([pos[entry_ids[i]] for i in final.tolist()]))
            self.normal_bank = NormalBank(*comm.broadcast(bank))
        return {"normal_bank_size": len(self.normal_bank), "n_normal_patches": total}

    def extend_normal_bank(self, train: Extracted, fit_idx: list[int], progress: bool = False,
                           comm: Collective = LOCAL) -> dict:
        """Warm fit: the bank keeps its entries and takes, at the coreset ratio, the patches of fit
        images it holds nothing from, farthest from the bank first (what it covers is not added).

        An image of the last fit that left no entry counts as new: its patches are near the bank
        and add the few that are not. Distributed: each worker adds from its own shard.
        """
        bank = self.normal_bank
        known = set(bank.image_ids)
        new = [i for i in fit_idx if train.samples[i].image_id not in known]
        feats, ids = torch.zeros(0, self.dim), []
        if new:
            f = train.features[new]
            _, c, h, w = f.shape
            flat = f.permute(0, 2, 3, 1).reshape(-1, c)
            sel = extend_farthest(flat, bank.index.search(flat)[0], target_size(flat.shape[0], self.config.coreset_ratio))
            feats, ids = flat[sel].clone(), [train.samples[new[o]].image_id for o in (sel // (h * w)).tolist()]
        parts = comm.all_gather((feats, ids))
        added = torch.cat([p[0] for p in parts])
        entry_ids = [bank.image_ids[o] for o in bank.owners.tolist()] + [x for p in parts for x in p[1]]
        distinct = sorted(set(entry_ids))
        pos = {x: i for i, x in enumerate(distinct)}
        self.normal_bank = NormalBank(torch.cat([bank.features, added]), distinct, torch.tensor([pos[x] for x in entry_ids]))
        n_new = int(comm.all_sum(len(new)))
        if progress:
            tqdm.write(f"normal bank: {len(added)} entries added from {n_new} new images to {len(bank)}")
        return {"normal_bank_size": len(self.normal_bank), "normal_bank_added": len(added), "new_normal_images": n_new}

    def fit_head(self, train: Extracted, fit_idx: list[int], progress: bool = False, comm: Collective = LOCAL,
                 confirmed: Confirmed = (), warm: bool = False) -> dict:
        """Learned parts (none for PatchCore); ``warm``: continue from the loaded ones."""
        return {}

    def calibrate(self, categories: list[str], scores: torch.Tensor, map_peaks: torch.Tensor | None = None) -> None:
        """Per-category decision thresholds from normal images only (never from test data).

        ``threshold`` decides on the image score; ``pixel_threshold`` cuts the smoothed anomaly map
        into a predicted defect mask, set by the same rule on the maps' peaks so that a normal image
        shows an (empty) mask as often as it is called anomalous.
        """
        q = self.config.threshold_quantile
        peaks = scores if map_peaks is None else map_peaks
        groups: dict[str, list[tuple[float, float]]] = {ANY_CATEGORY: list(zip(scores.tolist(), peaks.tolist(), strict=True))}
        for cat, s, p in zip(categories, scores.tolist(), peaks.tolist(), strict=True):
            groups.setdefault(cat, []).append((s, p))
        self.calibration = {}
        for cat, pairs in groups.items():
            v, pk = torch.tensor([s for s, _ in pairs]), torch.tensor([p for _, p in pairs])
            self.calibration[cat] = {
                "threshold": float(v.quantile(q)), "pixel_threshold": float(pk.quantile(q)),
                "normal_mean": float(v.mean()), "normal_std": float(v.std()) if len(v) > 1 else 0.0, "n": len(v)}

    def _calibration(self, category: str | None) -> dict | None:
        return self.calibration.get(category or ANY_CATEGORY) or self.calibration.get(ANY_CATEGORY)

    def threshold(self, category: str | None = None) -> float | None:
        """Image-score threshold of a category (the all-category one for unseen categories)."""
        entry = self._calibration(category)
        return entry["threshold"] if entry else None

    def pixel_threshold(self, category: str | None = None) -> float | None:
        """Anomaly-map threshold for the predicted mask (versions calibrated before it: the image threshold)."""
        entry = self._calibration(category)
        return entry.get("pixel_threshold", entry["threshold"]) if entry else None

    def normalise(self, score: float, category: str | None = None) -> float:
        """Score in (0, 1) with the category's threshold at 0.5 (a logistic over normal-score spread).

        Comparable across categories, which raw scores are not: what a labeling queue sorts by.
        """
        entry = self._calibration(category)
        if not entry:
            return float(score)
        scale = max(entry["normal_std"], 0.1 * abs(entry["threshold"]), 1e-6)
        return float(1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, (score - entry["threshold"]) / scale)))))

    # ----- scoring -------------------------------------------------------------------------
    def patch_scores(self, feats: torch.Tensor) -> torch.Tensor:
        """B x C x H x W patch features -> B x H x W anomaly scores (higher = more anomalous)."""
        raise NotImplementedError

    @torch.no_grad()
    def score_features(self, feats: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B, see ``image_scores``) and smoothed anomaly maps (B x S x S) from patch features."""
        self.eval()
        scores, maps = [], []
        size = self.config.image_size
        sigma = self.config.smoothing_sigma * size / 256
        ops: tuple[torch.Tensor, torch.Tensor] | None = None
        for i in range(0, feats.shape[0], batch_size):
            p = self.patch_scores(feats[i:i + batch_size])
            if ops is None:
                ops = map_operator(p.shape[1], size, sigma), map_operator(p.shape[2], size, sigma)
            maps.append(ops[0] @ p @ ops[1].T)
            scores.append(self.image_scores(p, maps[-1]))
        return torch.cat(scores), torch.cat(maps)

    def image_scores(self, patch_map: torch.Tensor, smoothed: torch.Tensor) -> torch.Tensor:
        """B image scores from B x H x W patch scores and their B x S x S smoothed maps: the most
        anomalous 32 px window (stride 8 px, at 256 px) of the smoothed map, as the published CRAD.

        A defect is an area, while normal texture leaves scattered single-patch highs. Measured on
        the unified dev benchmark (mean image AUROC, top patch -> window): PatchCore 90.7 -> 92.6,
        DMAD-10 93.4 -> 94.6, CRAD 83.9 -> 88.3; screw, the smallest defects, 88.9 -> 89.3 and
        90.6 -> 91.9. The smoothed map's single peak pixel is worse than either (PatchCore 89.9).
        """
        scale = self.config.image_size / 256
        window, stride = max(1, round(32 * scale)), max(1, round(8 * scale))
        return F.avg_pool2d(smoothed[:, None], window, stride).flatten(1).max(1).values

    @torch.no_grad()
    def score_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B x 3 x S x S in [0, 1]) -> image scores and anomaly maps."""
        return self.score_features(self.embedder(images))

    # ----- persistence ---------------------------------------------------------------------
    def head_state(self) -> dict[str, torch.Tensor]:
        """Learned tensors saved in weights.safetensors (backbone excluded: it is frozen)."""
        return {k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith("embedder.")}

    def save(self, folder: str | Path, partial: bool = False) -> Path:
        """Write a model version folder; ``partial`` allows an unfitted model (training checkpoints)."""
        folder = Path(folder)
        if not (self.fitted or partial):
            raise RuntimeError("model is not fitted")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(asdict(self.config), indent=1))
        save_file(self.head_state(), str(folder / "weights.safetensors"))
        if self.normal_bank is not None:
            self.normal_bank.save(folder)
        self.abnormal_bank.save(folder)
        (folder / "calibration.json").write_text(json.dumps(self.calibration, indent=1))
        if not self.fitted:
            (folder / "PARTIAL").write_text("a training checkpoint, not a model version\n")
        return folder

    def load_state(self, folder: Path) -> None:
        state = load_file(str(folder / "weights.safetensors"))
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("embedder.")]
        if missing or unexpected:
            raise RuntimeError(f"{folder}: weights do not fit a {self.kind} model ({missing[:3]}, {unexpected[:3]})")
        if self.uses_normal_bank and (folder / "normal_bank.json").is_file():
            self.normal_bank = NormalBank.load(folder)
        self.abnormal_bank = AbnormalBank.load(folder)
        self.calibration = json.loads((folder / "calibration.json").read_text())
        self.fitted = not (folder / "PARTIAL").exists()

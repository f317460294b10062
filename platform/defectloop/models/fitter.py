"""Fitting a model: the phases, the hold-out split, the normal bank, calibration, checkpoints.

    bank   normal bank: a coreset of the fit images' patches (``sampler``), or extended when warm
    head   the model's learned parts (HEAD_TRAINERS: DMAD's scorer, CRAD's head; PatchCore has none)
    calibration on held-back normal images (never test data)

With ``comm`` of world > 1 each worker holds a shard of the images and the workers agree through
the collective (pure torch.distributed, so models stay free of Ray). The modules themselves
(models/dmad.py, crad.py, patchcore.py) know nothing of any of this.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch

from defectloop.collective import LOCAL, Collective
from defectloop.data import Sample
from defectloop.data.tiles import firsts, image_grids
from defectloop.features import Extracted, extract, feature_buffer
from defectloop.memory import CoresetSampler, KCenterGreedy, NormalBank, extend_farthest, target_size
from defectloop.models.abnormal_memory import AbnormalMemory, Confirmed
from defectloop.models.base import AnomalyModel
from defectloop.models.calibration import Calibration
from defectloop.models.crad_training import train_crad_head
from defectloop.models.dmad_training import train_dmad_head
from defectloop.models.holdout import split_holdout
from defectloop.models.tile_choice import choose_tiles, tiled

log = logging.getLogger(__name__)

#: trains a model's learned parts: (model, train, fit_idx, progress, comm, confirmed, warm, held_idx) -> stats
HeadTrainer = Callable[..., dict]
HEAD_TRAINERS: dict[str, HeadTrainer] = {"dmad": train_dmad_head, "crad": train_crad_head}


class Fitter:
    """Fits one model; ``sampler`` (called with ``seed=``) picks the normal bank's coreset."""

    def __init__(self, model: AnomalyModel, sampler: Callable[..., CoresetSampler] = KCenterGreedy):
        self.model = model
        self.sampler = sampler

    def fit_samples(self, samples: Sequence[Sample], progress: bool = False, **fit: Any) -> dict:
        """Choose the tiles of the categories the config does not name yet (models/tile_choice.py),
        embed the samples as those tiles, and ``fit`` on them."""
        model = self.model
        model.config = choose_tiles(model.config, samples, model.embedder)
        train = extract(model.embedder, tiled(samples, model.config), model.config.image_size,
                        progress="features" if progress else False)
        return self.fit(train, progress=progress, **fit)

    def fit(self, train: Extracted, progress: bool = False, comm: Collective = LOCAL,
            checkpoint: Callable[[str], None] | None = None, done: frozenset[str] = frozenset(),
            confirmed: Confirmed = (), warm: bool = False, calibration_only: Collection[str] = ()) -> dict:
        """Build the normal bank, fit learned parts, calibrate thresholds on held-back normals.

        ``warm`` (a retraining from the served version, loaded into the model) keeps what was
        learned: the normal bank only gains entries from images it has not seen, and learned heads
        continue from their weights and input statistics (why: docs/models.md, warm retraining).

        ``checkpoint(phase)`` is called after the "bank" and "head" phases; phases in ``done`` were
        restored from a checkpoint and are skipped. ``confirmed`` (the same on every worker) are
        defects annotators confirmed on pool images: a model with an abnormal memory keeps them in
        its bank, and a learned head trains on them as real anomalies. ``calibration_only``: ids of
        normal images that are only calibrated on (confirmed normals held back from a retraining).
        """
        model, cfg = self.model, self.model.config
        if warm and model.uses_normal_bank and model.normal_bank is None:
            raise ValueError("a warm fit continues a fitted model: load one first")
        torch.manual_seed(cfg.seed + comm.rank)
        fit_idx, held_idx = split_holdout(train.samples, cfg.holdout_fraction, cfg.seed, calibration_only)
        if min(comm.all_gather(len(fit_idx))) == 0:
            raise ValueError("no normal training image to fit on" if comm.world == 1 else
                             "a worker's shard has no normal training image: use fewer workers")
        stats = {"warm": warm, "n_train_images": int(comm.all_sum(len(train.samples))),
                 "n_fit_normal": int(comm.all_sum(len(fit_idx))), "n_calibration": int(comm.all_sum(len(held_idx))),
                 "skipped": [x for part in comm.all_gather(train.skipped) for x in part], "workers": comm.world}
        if model.uses_normal_bank and "bank" not in done:
            build = self.extend_normal_bank if warm else self.build_normal_bank
            stats.update(build(train, fit_idx, progress, comm))
            if checkpoint:
                checkpoint("bank")
        if "head" not in done:
            trainer = HEAD_TRAINERS.get(model.kind)
            if trainer:
                stats.update(trainer(model, train, fit_idx, progress, comm, confirmed, warm, held_idx))
            if isinstance(model, AbnormalMemory):
                for prov, cells in confirmed:  # kept in the bank also where the head does not train on them
                    if prov.annotation_id not in model.abnormal_bank:
                        model.abnormal_bank.add(prov, cells)
            stats["confirmed_annotations"] = len(confirmed)
            if checkpoint:
                checkpoint("head")
        self.calibrate(train, held_idx, comm)
        stats["calibration"] = model.calibration.methods()
        model.fitted = True
        return stats

    def calibrate(self, train: Extracted, held_idx: list[int], comm: Collective = LOCAL) -> None:
        """Thresholds from the held-back normals of every worker (see Calibration)."""
        model = self.model
        parents = [train.samples[i].parent_id for i in held_idx]
        cats = [train.samples[held_idx[k]].category for k in firsts(parents)]
        scores, peaks = torch.zeros(0), torch.zeros(0)
        if held_idx:  # per image: a tiled image's score and map come from its tiles
            scores, maps = model.score_images(train.features[held_idx], image_grids([train.samples[i] for i in held_idx]))
            peaks = torch.stack([m.max() for m in maps])
        parts = comm.all_gather((cats, scores, peaks))
        if any(p[0] for p in parts):
            model.calibration = Calibration.fit([c for p in parts for c in p[0]], torch.cat([p[1] for p in parts]),
                                                torch.cat([p[2] for p in parts]), model.config.threshold_quantile)

    def build_normal_bank(self, train: Extracted, fit_idx: list[int], progress: bool = False,
                          comm: Collective = LOCAL) -> dict:
        """Coreset of the fit images' patches.

        Distributed: each worker selects twice its share from its own patches, and one worker
        reduces the union to the final size (raw patches never leave their worker).
        """
        model, cfg = self.model, self.model.config
        flat = patch_rows(train.features, fit_idx)
        n, (_, _, h, w) = len(fit_idx), train.features.shape
        owners = torch.arange(n).repeat_interleave(h * w)
        image_ids = [train.samples[i].image_id for i in fit_idx]
        total = int(comm.all_sum(flat.shape[0]))
        size = target_size(total, cfg.coreset_ratio, cfg.coreset_max)
        log.info("coreset: selecting %d of %d patches%s", size, total, f" on {comm.world} workers" if comm.world > 1 else "")
        if comm.world == 1:
            sel = self.sampler(seed=cfg.seed).select(flat, size)
            model.normal_bank = NormalBank(flat[sel].clone(), image_ids, owners[sel], model.index_factory)
        else:
            share = min(flat.shape[0], math.ceil(2 * size * flat.shape[0] / total))
            sel = self.sampler(seed=cfg.seed + comm.rank).select(flat, share)
            parts = comm.all_gather((flat[sel].clone(), [image_ids[o] for o in owners[sel].tolist()]))
            bank = None
            if comm.rank == 0:
                union = torch.cat([p[0] for p in parts])
                entry_ids = [x for p in parts for x in p[1]]
                final = self.sampler(seed=cfg.seed).select(union, min(size, union.shape[0]))
                distinct = sorted({entry_ids[i] for i in final.tolist()})
                pos = {x: i for i, x in enumerate(distinct)}
                bank = (union[final].clone(), distinct, torch.tensor([pos[entry_ids[i]] for i in final.tolist()]))
            model.normal_bank = NormalBank(*comm.broadcast(bank), model.index_factory)
        return {"normal_bank_size": len(model.normal_bank), "n_normal_patches": total}

    def extend_normal_bank(self, train: Extracted, fit_idx: list[int], progress: bool = False,
                           comm: Collective = LOCAL) -> dict:
        """Warm fit: the bank keeps its entries and takes, at the coreset ratio, the patches of fit
        images it holds nothing from, farthest from the bank first (what it covers is not added).

        An image of the last fit that left no entry counts as new: its patches are near the bank
        and add the few that are not. Distributed: each worker adds from its own shard.
        """
        model = self.model
        bank = model.normal_bank
        known = set(bank.image_ids)
        new = [i for i in fit_idx if train.samples[i].image_id not in known]
        feats, ids = torch.zeros(0, model.dim), []
        if new:
            f = train.features[new]
            _, c, h, w = f.shape
            flat = f.permute(0, 2, 3, 1).reshape(-1, c)
            sel = extend_farthest(flat, bank.index.search(flat)[0], target_size(flat.shape[0], model.config.coreset_ratio))
            feats, ids = flat[sel].clone(), [train.samples[new[o]].image_id for o in (sel // (h * w)).tolist()]
        parts = comm.all_gather((feats, ids))
        added = torch.cat([p[0] for p in parts])
        entry_ids = [bank.image_ids[o] for o in bank.owners.tolist()] + [x for p in parts for x in p[1]]
        distinct = sorted(set(entry_ids))
        pos = {x: i for i, x in enumerate(distinct)}
        model.normal_bank = NormalBank(torch.cat([bank.features, added]), distinct,
                                       torch.tensor([pos[x] for x in entry_ids]), model.index_factory)
        n_new = int(comm.all_sum(len(new)))
        log.info("normal bank: %d entries added from %d new images to %d", len(added), n_new, len(bank))
        return {"normal_bank_size": len(model.normal_bank), "normal_bank_added": len(added), "new_normal_images": n_new}


def patch_rows(features: torch.Tensor, images: list[int], chunk: int = 64) -> torch.Tensor:
    """The patches of some images (N x C x H x W features) as rows (patches x C), copied once, a
    chunk of images at a time, into a buffer that goes to disk when large (``feature_buffer``):
    the images seen as tiles at their own resolution make millions of patches (5.4M on the dev
    set with the screw at 3 x 3), and an index-then-permute copy held them twice in RAM."""
    _, c, h, w = features.shape
    out = feature_buffer((len(images) * h * w, c), max_memory=4 << 30)
    for i in range(0, len(images), chunk):
        part = features[images[i:i + chunk]]
        out[i * h * w:(i + len(part)) * h * w] = part.permute(0, 2, 3, 1).reshape(-1, c)
    return out

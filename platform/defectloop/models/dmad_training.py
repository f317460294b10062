"""Training the DMAD scorer: abnormal examples, the normal patch pool, the hinge-loss loop.

Every training patch is enhanced exactly as at scoring time, but leave-one-image-out: it never
sees bank entries of its own image (else the scorer learns "I am in the bank"). Pseudo-anomalies
are normal patches pushed 1-3 typical normal distances along the feature spread, with their
enhancement recomputed. Real (annotated) anomalies are weighted up against synthetic ones.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from defectloop.collective import LOCAL, Collective
from defectloop.data.synthetic import DefectAugmenter
from defectloop.data.tiles import firsts, image_grids
from defectloop.features import Extracted, image_tensor, mask_cells
from defectloop.memory import AbnormalBank, Provenance, knn
from defectloop.models.abnormal_memory import Confirmed
from defectloop.models.dmad import DMAD, Enhanced
from defectloop.models.head_choice import BANKS, HEAD, HeadChoices
from defectloop.models.holdout import split_validation
from defectloop.progress import bar as progress_bar

MARGIN = 0.5  # of the hinge loss, around the scorer's learned threshold


def nearest_normal(q: torch.Tensor, bank_feats: torch.Tensor, bank_owner: torch.Tensor,
                   query_owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest normal entry from another image than the query's (exact; used for training).

    A bank made of the query's own image alone leaves nothing else: then its nearest entry.
    """
    d, idx = knn(q, bank_feats, 1, exclude=(query_owner, bank_owner))
    d, idx = d[:, 0], idx[:, 0]
    alone = ~torch.isfinite(d)
    if alone.any():
        d_own, idx_own = knn(q[alone], bank_feats, 1)
        d[alone], idx[alone] = d_own[:, 0], idx_own[:, 0]
    return d, idx


def nearest_abnormal(q: torch.Tensor, feats: torch.Tensor, no_abnormal: float, owner: torch.Tensor,
                     query_owner: torch.Tensor) -> torch.Tensor:
    """Distance to the nearest abnormal entry of another image (``no_abnormal`` when there is none; training)."""
    if feats.shape[0] == 0:
        return torch.full((q.shape[0],), no_abnormal)
    d = knn(q, feats, 1, exclude=(query_owner, owner))[0][:, 0]
    return torch.where(torch.isfinite(d), d, torch.full_like(d, no_abnormal))


@dataclass
class Examples:
    """Abnormal patches of one kind (real or synthetic), with the image (owner) of each row."""

    feats: list[torch.Tensor]
    owners: list[torch.Tensor]

    def add(self, cells: torch.Tensor, owner: int) -> None:
        self.feats.append(cells)
        self.owners.append(torch.full((len(cells),), owner))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (torch.cat(self.feats), torch.cat(self.owners)) if self.feats else None


def synthetic_defects(model: DMAD, train: Extracted, fit_idx: list[int], per_category: int
                      ) -> list[tuple[int, torch.Tensor]]:
    """(image index, patches under the defect) of synthetic defects painted on fit images."""
    size, coverage = model.config.image_size, model.config.dmad.mask_coverage
    out = []
    items = [(i, train.samples[i]) for i in fit_idx]
    for i, painted, mask in DefectAugmenter(model.config.seed).paint(items, per_category):
        f = model.embedder(image_tensor(painted, size)[None])[0]
        cov = F.interpolate(torch.from_numpy(mask.astype("float32"))[None, None], size=(size, size), mode="area")[0, 0]
        cells = mask_cells(f, cov, coverage)
        if len(cells):
            out.append((i, cells))
    return out


def abnormal_examples(model: DMAD, train: Extracted, fit_idx: list[int], comm: Collective, confirmed: Confirmed,
                      ids: dict[str, int], validation: Collection[int] = ()) -> tuple[Examples, Examples]:
    """Rebuild the abnormal bank (every worker the same) and return this worker's real and synthetic
    examples: annotated training masks (but those of ``validation`` images, kept in the bank only),
    synthetic defects (the cold start, and extra negatives), and annotators' confirmed defects (on
    pool images: each gets an owner id of its own in ``ids``; weak positives count with the
    synthetic ones)."""
    cfg = model.config.dmad
    found: list[tuple[Provenance, torch.Tensor]] = []
    real, synthetic = Examples([], []), Examples([], [])
    for i, (s, m) in enumerate(zip(train.samples, train.masks, strict=True)):
        if s.label == 1 and m is not None:
            cells = mask_cells(train.features[i], m, cfg.mask_coverage)
            if len(cells):
                found.append((Provenance(train_key(s.image_id), s.image_id, s.category, s.defect), cells))
                if i not in validation:
                    real.add(cells, ids[s.image_id])
    for i, cells in synthetic_defects(model, train, fit_idx, math.ceil(cfg.synthetic_per_category / comm.world)):
        s = train.samples[i]
        found.append((Provenance(f"synthetic:{s.image_id}", s.image_id, s.category, "synthetic", "synthetic"), cells))
        synthetic.add(cells, ids[s.image_id])
    for prov, _ in confirmed:
        ids.setdefault(prov.image_id, len(train.samples) + len(ids))
    for prov, cells in list(confirmed)[comm.rank::comm.world]:  # trained on: shared out among the workers
        # weak positives (a bag of an image's top patches, no mask) weigh what synthetic defects do
        (synthetic if prov.source == "weak" else real).add(cells, ids[prov.image_id])
    bank = AbnormalBank(model.dim, model.index_factory)
    for part in comm.all_gather(found):
        for prov, cells in part:
            bank.add(prov, cells)
    for prov, cells in confirmed:
        bank.add(prov, cells)
    model.abnormal_bank = bank
    return real, synthetic


def train_key(image_id: str) -> str:
    """The abnormal bank's name for a training image's mask."""
    return f"train:{image_id}"


def train_dmad_head(model: DMAD, train: Extracted, fit_idx: list[int], progress: bool = False,
                    comm: Collective = LOCAL, confirmed: Confirmed = (), warm: bool = False,
                    held_idx: Sequence[int] = ()) -> dict:
    """Rebuild the abnormal bank, train the scorer (``warm``: from its weights and statistics), and
    choose per category whether it serves, on the held-back normals ``held_idx`` and the labeled
    defects held back from its training (see choose_heads)."""
    cfg, scorer = model.config.dmad, model.scorer
    g = torch.Generator().manual_seed(model.config.seed + comm.rank)
    # owners: one number per image of this worker (the tiles of an image share it, so that a patch
    # never meets its own image's entries, overlaps included); others' images are -1
    image = {}
    row_owner = torch.tensor([image.setdefault(s.parent_id, len(image)) for s in train.samples], dtype=torch.long)
    ids = {s.image_id: int(row_owner[i]) for i, s in enumerate(train.samples)}
    bank = model.normal_bank
    bank_owner = torch.tensor([ids.get(x, -1) for x in bank.image_ids])[bank.owners]
    defects = [(s.parent_id, s.category, m is not None) for s, m in zip(train.samples, train.masks, strict=True) if s.label == 1]
    held_ids = split_validation(sorted({d for part in comm.all_gather(defects) for d in part}), cfg.validation_fraction,
                                model.config.seed)
    val_idx = [i for i, s in enumerate(train.samples) if s.label == 1 and s.parent_id in held_ids]
    real, synthetic = abnormal_examples(model, train, fit_idx, comm, confirmed, ids, set(val_idx))
    ab_feats, ab_group, ab_provs = model.abnormal_bank.tensors()
    ab_owner = torch.tensor([ids.get(p.image_id, -1) for p in ab_provs], dtype=torch.long)[ab_group]

    # normal patch pool from the fitted images (this worker's share)
    _, c, h, w = train.features.shape
    n_img = len(fit_idx)
    n_pool = min(cfg.train_patches // comm.world, n_img * h * w)
    flat_idx = torch.randperm(n_img * h * w, generator=g)[:n_pool]
    image, cell = torch.tensor(fit_idx, dtype=torch.long)[flat_idx // (h * w)], flat_idx % (h * w)
    q_n = train.features[image, :, cell // w, cell % w].float()  # only the patches drawn, not all of them
    own_n = row_owner[image]
    near_n = nearest_normal(q_n, bank.features, bank_owner, own_n)
    if not warm:  # feature statistics and distance scale: the same on every worker
        keep = n_pool if comm.world == 1 else 4096
        parts = comm.all_gather((q_n[:keep], near_n[0][:keep]))
        sample, dists = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        scorer.mean.copy_(sample.mean(0))
        scorer.std.copy_(sample.std(0).clamp_min(1e-6))
        scorer.scale.fill_(float(dists.median().clamp_min(1e-6)))

    def enhanced(q: torch.Tensor, owner: torch.Tensor, near: tuple[torch.Tensor, torch.Tensor] | None = None) -> Enhanced:
        d_n, idx = near or nearest_normal(q, bank.features, bank_owner, owner)
        d_a = nearest_abnormal(q, ab_feats, model.no_abnormal(), ab_owner, owner)
        return Enhanced(q, q - bank.features[idx], d_n, d_a)

    e_n = enhanced(q_n, own_n, near_n)  # the scale needed the normal pool's search already
    # pseudo-anomalies: noise along the feature spread, 1-3 typical normal distances long
    noise = torch.randn(q_n.shape, generator=g) * scorer.std
    length = scorer.scale * (1 + 2 * torch.rand(n_pool, 1, generator=g))
    e_p = enhanced(q_n + noise / noise.norm(dim=1, keepdim=True) * length, own_n)
    e_r = enhanced(*t) if (t := real.tensors()) else None
    e_s = enhanced(*t) if (t := synthetic.tensors()) else None
    steps = cfg.warm_steps if warm else cfg.steps
    loss = hinge_training(model, e_n, e_p, e_r, e_s, g, progress, comm, steps)
    choose_heads(model, train, list(held_idx), val_idx, comm, confirmed)
    return {"abnormal_bank_size": len(model.abnormal_bank), "head_steps": steps,
            "real_abnormal_patches": int(comm.all_sum(0 if e_r is None else len(e_r.q))),
            "synthetic_abnormal_patches": int(comm.all_sum(0 if e_s is None else len(e_s.q))),
            "final_loss": comm.all_sum(loss) / comm.world, "heads": model.head_choices.as_dict()}


@torch.no_grad()
def choose_heads(model: DMAD, train: Extracted, held_idx: list[int], val_idx: list[int], comm: Collective,
                 confirmed: Confirmed = ()) -> None:
    """Per category, the learned correction serves only where it ranks the held-back normals and the
    defects held back from its training better than the banks' score alone, or, with no such
    defect, where it trained on real masks (models/head_choice.py). The held-back defects are
    scored without their own masks' bank entries, as unseen ones would be."""
    validation = set(val_idx)
    masks = Counter(c for _, c in {(s.parent_id, s.category) for i, (s, m) in enumerate(zip(train.samples, train.masks, strict=True))
                                   if s.label == 1 and m is not None and i not in validation})  # images, not tiles
    masks = sum(comm.all_gather(masks), Counter()) + Counter(p.category for p, _ in confirmed if p.source == "annotation")
    idx = sorted(held_idx + val_idx)  # an image's tiles consecutive: scored as one image
    twin = model.with_memory(model.abnormal_bank.without({train_key(train.samples[i].image_id) for i in val_idx}),
                             model.normal_evidence)
    scores = {}
    parents = [train.samples[i].parent_id for i in idx]
    images = [idx[k] for k in firsts(parents)]  # each image's first tile: its category and label
    grids = image_grids([train.samples[i] for i in idx])
    for mode in (HEAD, BANKS):
        twin.head_choices = HeadChoices(default=mode)
        scores[mode] = twin.score_images(train.features[idx], grids)[0] if idx else torch.zeros(0)
    parts = comm.all_gather(([train.samples[i].category for i in images], torch.tensor([train.samples[i].label for i in images]),
                             scores[HEAD], scores[BANKS]))
    model.head_choices = HeadChoices.choose([c for p in parts for c in p[0]],
                                            *(torch.cat([p[k] for p in parts]) for k in (1, 2, 3)), dict(masks))


def hinge_training(model: DMAD, e_n: Enhanced, e_p: Enhanced, e_r: Enhanced | None, e_s: Enhanced | None,
                   g: torch.Generator, progress: bool, comm: Collective, steps: int) -> float:
    """The scorer's training loop (``steps`` steps); returns the last loss. Normal patches should score below the
    learned threshold by the margin, pseudo, real and synthetic anomalies above it."""
    cfg, scorer = model.config.dmad, model.scorer
    wrapped = comm.wrap(scorer)
    opt = torch.optim.Adam(scorer.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    scorer.train()
    bs, n_pool = max(2, cfg.batch_size // comm.world), len(e_n.q)
    bar = progress_bar(range(steps), desc="dmad scorer", shown=progress)
    loss_val = float("nan")
    for _ in bar:
        # one forward over [normal | pseudo | real | synthetic] for each head in turn, each with its
        # own batch (DDP wants one forward per backward)
        groups = []
        for _head in scorer.heads:
            i = torch.randint(n_pool, (bs,), generator=g)
            groups += [(e_n.take(i), 1.0, -1.0), (e_p.take(i), 1.0, 1.0)]
            for e, weight in ((e_r, cfg.real_weight), (e_s, cfg.synthetic_weight)):
                if e is not None:
                    groups.append((e.take(torch.randint(len(e.q), (bs // 2,), generator=g)), weight, 1.0))
        out = wrapped(Enhanced.cat([e for e, _, _ in groups]), per_head=True)
        t = scorer.threshold
        loss, start = out.new_zeros(()), 0
        for e, weight, sign in groups:  # sign -1: should score below the threshold, +1: above
            o = out[start:start + len(e.q)]
            start += len(e.q)
            loss = loss + weight * F.relu(MARGIN - sign * (o - t)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        loss_val = loss.item()
        bar.set_postfix(loss=f"{loss_val:.3f}")
    scorer.eval()
    return loss_val


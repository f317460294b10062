"""What every anomaly model is at scoring time: a frozen embedder, its memory, a calibration.

A model version is a directory: ``config.json``, ``weights.safetensors`` (learned parts, if any),
``normal_bank.*``, ``abnormal_bank.*`` (models with an abnormal memory), ``calibration.json`` and,
once evaluated, ``metrics.json``. Fitting is the business of :mod:`defectloop.models.fitter`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from defectloop.data.tiles import Grid
from defectloop.features import PatchEmbedder, load_backbone
from defectloop.memory import IndexFactory, NormalBank, build_index
from defectloop.models.calibration import Calibration
from defectloop.models.config import ModelConfig
from defectloop.models.patch_scores import PatchScores
from defectloop.models.prediction import PostProcessor, Prediction


def kept_patches(feats: torch.Tensor, keep: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """B x C x H x W features -> the patches as rows (N x C), only those in ``keep`` where given,
    and the function that puts one score per row back as B x H x W (0 for the patches left out)."""
    b, c, h, w = feats.shape
    rows = feats.permute(0, 2, 3, 1).reshape(-1, c)
    if keep is None:
        return rows, lambda s: s.view(b, h, w)
    where = keep.reshape(-1)

    def put(s: torch.Tensor) -> torch.Tensor:
        return s.new_zeros(b * h * w).masked_scatter_(where, s).view(b, h, w)

    return rows[where], put


class AnomalyModel(nn.Module):
    """Base class: frozen embedder + (optionally) a normal bank; subclasses define ``patch_scores``.

    ``index`` builds the nearest-neighbour index of every bank (a strategy, ``build_index`` by default).
    """

    kind = "base"
    #: whether the model keeps a discrete normal bank (CRAD's memory is its learned grids)
    uses_normal_bank = True

    def __init__(self, config: ModelConfig, index: IndexFactory = build_index):
        super().__init__()
        self.config = config
        self.index_factory = index
        self.embedder = PatchEmbedder(load_backbone(config.backbone, config.backbone_checkpoint))
        self.dim = self.embedder.dim
        self.normal_bank: NormalBank | None = None
        self.calibration = Calibration()
        self.post = PostProcessor(config.image_size, config.smoothing_sigma, config.tile_overlap)
        self.fitted = False

    # ----- scoring -------------------------------------------------------------------------
    def patch_scores(self, feats: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """B x C x H x W patch features -> B x H x W anomaly scores (higher = more anomalous).
        ``keep`` (B x H x W bool): the patches needed (``PostProcessor.needed``); a model may leave
        the others 0."""
        raise NotImplementedError

    @torch.no_grad()
    def score_features(self, feats: torch.Tensor, batch_size: int = 64,
                       keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B) and smoothed anomaly maps (B x S x S) from patch features (only the
        patches in ``keep`` computed, where given: the rest of a map is then not the tile's)."""
        self.eval()
        scores, maps = [], []
        for i in range(0, feats.shape[0], batch_size):
            part = None if keep is None else keep[i:i + batch_size]
            maps.append(self.post.maps(self.patch_scores(feats[i:i + batch_size], part)))
            scores.append(self.post.image_scores(maps[-1]))
        return torch.cat(scores), torch.cat(maps)

    def score_images(self, feats: torch.Tensor, grids: Sequence[Grid]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image scores and maps from the features of tiles (B x C x H x W), ``grids`` giving the
        grid of each image: an image's tiles are consecutive rows (see data/tiles.py)."""
        scores, maps = self.score_features(feats, keep=self.post.needed(grids, *feats.shape[2:]))
        return self.post.stitched(scores, maps, grids)

    def predict_features(self, feats: torch.Tensor, categories: Sequence[str | None],
                         grids: Sequence[Grid] | None = None) -> list[Prediction]:
        """One Prediction per image of patch features (B x C x H x W): a row each, or
        ``grids[i].count`` consecutive rows (its tiles) for image i."""
        keep = None if grids is None else self.post.needed(grids, *feats.shape[2:])
        return self._predictions(*self.score_features(feats, keep=keep), categories, grids)

    def pool_scores(self, feats: torch.Tensor) -> PatchScores:
        """The patch scores of a pool's features (B x C x H x W), kept current as the memory changes."""
        return PatchScores(self, feats)

    def predict_patches(self, patch_scores: torch.Tensor, categories: Sequence[str | None],
                        grids: Sequence[Grid] | None = None) -> list[Prediction]:
        """One Prediction per image of patch scores (B x H x W, e.g. from ``pool_scores``): a row
        each, or ``grids[i].count`` consecutive rows for image i."""
        maps = self.post.maps(patch_scores)
        return self._predictions(self.post.image_scores(maps), maps, categories, grids)

    def _predictions(self, scores: torch.Tensor, maps: torch.Tensor, categories: Sequence[str | None],
                     grids: Sequence[Grid] | None) -> list[Prediction]:
        """Rows' scores and maps -> Predictions: a row an image, or ``grids[i]`` tiles stitched for image i."""
        if grids is not None:
            return self.post.predictions(*self.post.stitched(scores, maps, grids), categories, self.calibration)
        return self.post.predictions(scores, maps, categories, self.calibration)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, categories: Sequence[str | None],
                grids: Sequence[Grid] | None = None) -> list[Prediction]:
        """Images (B x 3 x S x S in [0, 1], S = ``config.image_size``) -> one Prediction each; or
        tiles, ``grids[i].count`` consecutive ones for image i (``features.tile_tensors``)."""
        return self.predict_features(self.embedder(images).float(), categories, grids)

    def memory_by_category(self) -> dict[str, dict[str, int]]:
        """Bank entries per category: {category: {"normal": n, "abnormal": m}} (image ids start with
        their category)."""
        out: dict[str, dict[str, int]] = {}
        bank = self.normal_bank
        if bank is not None:
            per_image = torch.bincount(bank.owners, minlength=len(bank.image_ids)).tolist()
            for image_id, n in zip(bank.image_ids, per_image, strict=True):
                entry = out.setdefault(image_id.split("/", 1)[0], {"normal": 0, "abnormal": 0})
                entry["normal"] += n
        return out

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
        (folder / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1))
        save_file(self.head_state(), str(folder / "weights.safetensors"))
        if self.normal_bank is not None:
            self.normal_bank.save(folder)
        self.save_memory(folder)
        self.calibration.save(folder / "calibration.json")
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
            self.normal_bank = NormalBank.load(folder, index=self.index_factory)
        self.load_memory(folder)
        self.calibration = Calibration.load(folder / "calibration.json")
        self.fitted = not (folder / "PARTIAL").exists()

    def save_memory(self, folder: Path) -> None:
        """Hook for memory beyond the normal bank (see AbnormalMemory)."""

    def load_memory(self, folder: Path) -> None:
        """Hook for memory beyond the normal bank (see AbnormalMemory)."""

"""Model settings: what every model shares, and one nested section per learned head.

Saved as ``config.json`` in each version. Versions written before the sections existed kept every
setting at the top level (``steps``, ``crad_epochs``, an ``extra`` bag): :meth:`ModelConfig.from_dict`
moves those keys into their section, so old versions still load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from defectloop.data.tiles import WHOLE, Grid, Tile, tiles


@dataclass
class DMADConfig:
    """The DMAD scorer: abnormal patches, heads, training (see models/dmad.py)."""

    mask_coverage: float = 0.25  # a patch is abnormal when this fraction of its cell is defective
    hidden: int = 256
    heads: int = 3  # correction heads averaged (one head's ranking swings with its seed)
    steps: int = 1500
    warm_steps: int = 300  # a warm retraining fine-tunes the served head: a fifth of a fit's steps
    batch_size: int = 1024
    lr: float = 1e-3
    real_weight: float = 5.0
    synthetic_weight: float = 1.0  # also the weight of weak positives (an image called anomalous, no mask)
    weak_patches: float = 0.01  # an image called anomalous without a mask: its most anomalous patches, this share
    synthetic_per_category: int = 8
    validation_fraction: float = 0.2  # of a category's masked training defects, held back to judge the head
    train_patches: int = 100_000


@dataclass
class CRADConfig:
    """The CRAD head: grids, fusion network, training (see models/crad.py and docs/crad.md)."""

    epochs: int = 40
    patience: int = 8  # epochs without a better held-back loss before stopping
    batch_size: int = 16
    lr: float = 1e-3  # the network; the grids take grid_lr
    grid_lr: float = 0.1
    weight_decay: float = 0.01
    layers: int = 2  # 4 cost 1.5x the fit time for no better pixel AUROC (docs/crad.md)
    width: int = 0  # fusion channels; 0 = the backbone's patch dimension
    expansion: int = 2
    local_res: int = 16
    global_res: int = 4
    use_global: bool = True
    refine: bool = False  # the similarity blend; off: it cost 10 points of pixel AUROC (docs/crad.md)
    jitter: float = 0.05
    clusters: int = 0  # feature statistics per cluster of images: 0 = chosen by silhouette, 1 = one set
    bf16: bool = True  # bfloat16 autocast while training the head


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
    # the grid of tiles per category (data/tiles.py: rows x cols, or n for n x n); a category not
    # named is chosen at its first fit (models/tile_choice.py) and recorded here, so every version
    # says how it sees each category
    tiles: dict[str, Grid] = field(default_factory=dict)
    max_tiles: int = 8  # tiles a side at most (8 x 8: 1152 px at 256 px tiles and the overlap below)
    tile_overlap: int = 128  # pixels two neighbouring tiles share: each shows only its middle (data/tiles.py)
    dmad: DMADConfig = field(default_factory=DMADConfig)
    crad: CRADConfig = field(default_factory=CRADConfig)

    def __post_init__(self) -> None:
        self.tiles = {str(c): Grid.of(g) for c, g in self.tiles.items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def grid(self, category: str | None) -> Grid:
        """The grid an image of this category is cut into (1 x 1, the whole image, for a category
        without a choice)."""
        return self.tiles.get(category or "", WHOLE)

    def tiling(self, category: str | None) -> list[Tile]:
        """The tiles an image of this category is seen as."""
        return tiles(self.grid(category), self.image_size, self.tile_overlap)

    def read_size(self, category: str | None) -> int:
        """The model size ``read_image`` reads an image of this category for: the long side of
        the image as its tiles cut it."""
        return max(self.grid(category).shape(self.image_size, self.tile_overlap))

    def with_settings(self, settings: list[str]) -> ModelConfig:
        """A copy with ``key=value`` settings applied (``dmad.steps=3000``; values read as JSON when they parse)."""
        data = self.to_dict()
        for item in settings:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"setting {item!r}: expected key=value")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            section, _, name = key.rpartition(".")
            (data.setdefault(section, {}) if section else data)[name] = value
        return ModelConfig.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """From config.json or a user's settings file; unknown keys are an error that names them."""
        data = _sectioned(dict(data))
        sections = {"dmad": DMADConfig, "crad": CRADConfig}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        for name, section in sections.items():
            part = data.get(name) or {}
            if isinstance(part, dict):
                names = {f.name for f in fields(section)}
                unknown += sorted(f"{name}.{k}" for k in set(part) - names)
                data[name] = section(**{k: v for k, v in part.items() if k in names})
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)


#: top-level keys of versions saved before the sections, and where they live now
_LEGACY_DMAD = {f.name for f in fields(DMADConfig)}
_LEGACY_CRAD = {"crad_global": "use_global"}


def _sectioned(data: dict[str, Any]) -> dict[str, Any]:
    """Move flat (pre-section) keys into their section; an empty legacy ``extra`` bag is dropped."""
    if data.get("extra") == {}:
        del data["extra"]
    dmad, crad = dict(data.get("dmad") or {}), dict(data.get("crad") or {})
    for key in list(data):
        if key in _LEGACY_DMAD:
            dmad[key] = data.pop(key)
        elif key.startswith("crad_"):
            crad[_LEGACY_CRAD.get(key, key.removeprefix("crad_"))] = data.pop(key)
    if "lr" in dmad and "lr" not in crad and crad:  # one learning rate served both heads
        crad["lr"] = dmad["lr"]
    data["dmad"], data["crad"] = dmad, crad
    return data

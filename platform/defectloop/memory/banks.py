"""Normal and abnormal memory banks, and the confirmed normals' evidence, saved as safetensors +
JSON (never pickle).

The abnormal bank keeps the provenance of every entry (image, annotation, category, defect label)
so that re-sending, editing or deleting an annotation replaces or removes its entries instead of
duplicating them, and so that a training patch can leave out its own image's entries.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from defectloop.memory.nn_index import IndexFactory, NNIndex, build_index


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class NormalBank:
    """Coreset of normal patch features, each tagged with the image it came from."""

    def __init__(self, features: torch.Tensor, image_ids: list[str], owners: torch.Tensor,
                 index: IndexFactory = build_index):
        self.features = features.float().contiguous()
        self.image_ids = image_ids  # distinct source images
        self.owners = owners.long()  # per entry: index into image_ids
        self.index_factory = index
        self._index: NNIndex | None = None

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def index(self) -> NNIndex:
        if self._index is None:
            self._index = self.index_factory(self.features)
        return self._index

    def save(self, folder: Path, name: str = "normal_bank") -> None:
        save_file({"features": self.features, "owners": self.owners}, str(folder / f"{name}.safetensors"))
        _write_json(folder / f"{name}.json", {"image_ids": self.image_ids})

    @classmethod
    def load(cls, folder: Path, name: str = "normal_bank", index: IndexFactory = build_index) -> NormalBank:
        t = load_file(str(folder / f"{name}.safetensors"))
        meta = json.loads((folder / f"{name}.json").read_text())
        return cls(t["features"], meta["image_ids"], t["owners"], index)


@dataclass(frozen=True)
class Provenance:
    """Where abnormal-bank entries came from."""

    annotation_id: str
    image_id: str
    category: str = ""
    defect: str = ""
    source: str = "annotation"  # a drawn mask; or "weak" (an image called anomalous: its top patches), "synthetic"


class AbnormalBank:
    """Patch features under confirmed (or synthetic) defect masks, grouped by annotation.

    ``add`` is idempotent per annotation id: the same annotation sent twice, or edited, leaves
    exactly the entries of its latest version. ``version`` increases on every change, so that a
    serving model can tell a new bank apart from the one it has loaded.
    """

    def __init__(self, dim: int, index: IndexFactory = build_index):
        self.dim = dim
        self.index_factory = index
        self._groups: dict[str, tuple[Provenance, torch.Tensor]] = {}
        self.version = 0
        self._cache: tuple[torch.Tensor, torch.Tensor, list[Provenance]] | None = None
        self._index: NNIndex | None = None

    def __len__(self) -> int:
        return sum(f.shape[0] for _, f in self._groups.values())

    def __contains__(self, annotation_id: str) -> bool:
        return annotation_id in self._groups

    @property
    def annotations(self) -> list[Provenance]:
        return [p for p, _ in self._groups.values()]

    def entries(self) -> dict[str, torch.Tensor]:
        """Annotation id -> its features. A tensor is replaced, never changed in place, on an edit:
        comparing them by identity tells which annotations changed since an earlier call."""
        return {name: f for name, (_, f) in self._groups.items()}

    def add(self, provenance: Provenance, features: torch.Tensor) -> None:
        """Add (or replace) the entries of one annotation; an empty tensor removes them."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected N x {self.dim} features, got {tuple(features.shape)}")
        if features.shape[0] == 0:
            self.remove(provenance.annotation_id)
            return
        self._groups[provenance.annotation_id] = (provenance, features.detach().float().clone())
        self._changed()

    def remove(self, annotation_id: str) -> bool:
        """Drop an annotation's entries; returns whether it was there."""
        if self._groups.pop(annotation_id, None) is None:
            return False
        self._changed()
        return True

    def without(self, names: set[str]) -> AbnormalBank:
        """A copy without the named groups (the kept tensors are shared: they never change in place)."""
        out = type(self)(self.dim, self.index_factory)
        out._groups = {name: group for name, group in self._groups.items() if name not in names}
        return out

    def _changed(self) -> None:
        self.version += 1
        self._cache = self._index = None

    @property
    def index(self) -> NNIndex:
        """Nearest-entry search over the current entries (rebuilt after any change)."""
        if self._index is None:
            self._index = self.index_factory(self.tensors()[0])
        return self._index

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, list[Provenance]]:
        """(features M x D, group index per entry M, provenance per group)."""
        if self._cache is None:
            provs = [p for p, _ in self._groups.values()]
            feats = [f for _, f in self._groups.values()]
            if feats:
                group = torch.cat([torch.full((f.shape[0],), i, dtype=torch.long) for i, f in enumerate(feats)])
                self._cache = (torch.cat(feats), group, provs)
            else:
                self._cache = (torch.zeros(0, self.dim), torch.zeros(0, dtype=torch.long), [])
        return self._cache

    def save(self, folder: Path, name: str = "abnormal_bank") -> None:
        feats, group, provs = self.tensors()
        save_file({"features": feats.contiguous(), "group": group}, str(folder / f"{name}.safetensors"))
        _write_json(folder / f"{name}.json", {"dim": self.dim, "version": self.version,
                                             "groups": [asdict(p) for p in provs]})

    @classmethod
    def load(cls, folder: Path, name: str = "abnormal_bank", index: IndexFactory = build_index) -> AbnormalBank:
        meta = json.loads((folder / f"{name}.json").read_text())
        t = load_file(str(folder / f"{name}.safetensors"))
        bank = cls(meta["dim"], index)
        for i, p in enumerate(meta["groups"]):
            bank._groups[p["annotation_id"]] = (Provenance(**p), t["features"][t["group"] == i].clone())
        bank.version = meta["version"]
        return bank


class NormalEvidence(AbnormalBank):
    """Patches of pool images annotators confirmed normal, read beside the normal bank until a
    retraining takes the images into it: the abnormal bank's bookkeeping (grouped, idempotent per
    key, versioned, saved the same way), with one group per image."""

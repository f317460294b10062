"""Annotators' answers -> what the model learns: abnormal-bank entries and image-level labels.

A Label Studio annotation says one of four things about its image: here are defect masks
(brush regions), it is anomalous (no mask), it is normal, or (deleted) nothing any more. Masks
become abnormal-bank entries keyed by the annotation id, so the same annotation delivered twice
(webhook and sync) or edited later leaves exactly the entries of its latest version, and a deletion
removes them. An image called anomalous without a mask adds weak positives (its most anomalous
patches) the same way. An image every verdict calls normal becomes normal evidence keyed by the
image (two annotators agreeing add it once). All verdicts are image-level labels too, kept in a ledger (the
loop's record of what was labeled). The next retraining reads the confirmed masks from the served
bank, and the images confirmed normal from the registry (``Feedback.normal_images``, published by
the loop), which join the normal training images.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from defectloop.labeling.brush import BrushRLE, MaskCodec
from defectloop.labeling.label_config import ANOMALOUS, NORMAL, LabelConfig
from defectloop.memory import Provenance
from defectloop.models import AbnormalMemory, AnomalyModel

Kind = Literal["mask", "anomalous", "normal", "deleted", "empty"]


@dataclass
class Verdict:
    """What one annotation says about one image."""

    annotation_id: str
    task_id: int
    image: str  # the task's image URI: the image's identity
    category: str
    kind: Kind
    source: str = ""  # where the pool keeps the image (local path or s3:// URI), for the retraining
    defects: list[str] = field(default_factory=list)
    mask: np.ndarray | None = None  # H x W bool, union of the brush regions

    def ledger_entry(self) -> dict:
        d = asdict(self)
        d.pop("mask")
        d["mask_pixels"] = 0 if self.mask is None else int(self.mask.sum())
        if self.mask is not None and self.mask.any():
            d["mask_cells"] = encode_cells(self.mask)
        return d


#: side of the grid a confirmed mask is kept at in the ledger (for mask edges: Calibration.with_mask_levels)
MASK_CELLS = 128


def encode_cells(mask: np.ndarray) -> str:
    """An H x W mask as MASK_CELLS x MASK_CELLS cells (a cell is defective where any pixel of it
    is), bit-packed in base64: 2.7 kB a mask, whatever the image's size."""
    box = Image.fromarray(mask.astype(np.uint8) * 255).resize((MASK_CELLS, MASK_CELLS), Image.BOX)
    return base64.b64encode(np.packbits(np.asarray(box) > 0).tobytes()).decode("ascii")


def decode_cells(text: str) -> np.ndarray:
    """MASK_CELLS x MASK_CELLS bool cells of ``encode_cells``."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8), count=MASK_CELLS * MASK_CELLS)
    return bits.reshape(MASK_CELLS, MASK_CELLS).astype(bool)


def cells_at(cells: Sequence[str], size: tuple[int, int]) -> torch.Tensor:
    """Masks kept by ``encode_cells`` as N x H x W bool, at an anomaly map's size (nearest cell)."""
    if not cells:
        return torch.zeros(0, *size, dtype=torch.bool)
    grid = torch.from_numpy(np.stack([decode_cells(c) for c in cells]))
    return F.interpolate(grid[:, None].float(), size=size, mode="nearest")[:, 0].bool()


def read_annotation(annotation: dict, task: dict, config: LabelConfig, codec: MaskCodec | None = None) -> Verdict:
    """Decode a Label Studio annotation (API or webhook form) into a verdict."""
    codec = codec or BrushRLE()
    data = task.get("data") or {}
    base = dict(annotation_id=str(annotation["id"]), task_id=int(task.get("id") or annotation.get("task")),
                image=str(data.get(config.image_key, "")), category=str(data.get("category", "")),
                source=str(data.get("source", "")))
    if annotation.get("was_cancelled"):
        return Verdict(**base, kind="empty")
    mask, defects, choice = None, set(), None
    for r in annotation.get("result") or []:
        value = r.get("value") or {}
        if r.get("type") == "brushlabels" and r.get("from_name") == config.brush and value.get("rle"):
            h, w = int(r["original_height"]), int(r["original_width"])
            m = codec.decode(value["rle"], h, w)
            if mask is not None and mask.shape != m.shape:
                raise ValueError(f"annotation {base['annotation_id']}: brush regions of different image sizes")
            mask = m if mask is None else (mask | m)
            defects.update(value.get("brushlabels") or [])
        elif r.get("type") == "choices" and r.get("from_name") == config.choices:
            choice = (value.get("choices") or [None])[0]
    if mask is not None and mask.any():
        return Verdict(**base, kind="mask", defects=sorted(defects), mask=mask)
    if choice == ANOMALOUS:
        return Verdict(**base, kind="anomalous")
    if choice == NORMAL:
        return Verdict(**base, kind="normal")
    return Verdict(**base, kind="empty")


class Feedback:
    """Applies verdicts to the model (``confirm``/``forget``, where it has an abnormal memory) and to
    the label ledger (a JSON file)."""

    def __init__(self, model: AnomalyModel, ledger: str | Path, load_image: Callable[[Verdict], np.ndarray]):
        self.model = model
        self.ledger_path = Path(ledger)
        self.load_image = load_image
        self.ledger: dict[str, dict] = json.loads(self.ledger_path.read_text()) if self.ledger_path.exists() else {}

    def key(self, annotation_id: str) -> str:
        """The memory's key for an annotation's defect mask."""
        return f"ls:{annotation_id}"

    @staticmethod
    def normal_key(image: str) -> str:
        """The memory's key for an image's normal evidence."""
        return f"normal:{image}"

    def apply(self, verdict: Verdict) -> bool:
        """Apply one verdict; returns whether the model's memory changed."""
        model = self.model
        key = self.key(verdict.annotation_id)
        before = self.ledger.get(verdict.annotation_id)
        changed = False
        if isinstance(model, AbnormalMemory):
            if verdict.kind == "mask":
                prov = Provenance(key, verdict.image, verdict.category, "+".join(verdict.defects) or "defect")
                model.confirm(prov, self.load_image(verdict), verdict.mask)
                changed = True
            elif verdict.kind == "anomalous":  # no mask: weak positives (the image's most anomalous patches)
                if (before or {}).get("kind") != "anomalous" or key not in model.abnormal_bank:
                    model.confirm_anomalous(Provenance(key, verdict.image, verdict.category), self.load_image(verdict))
                    changed = True
            else:  # deleted, or edited into a normal verdict
                changed = model.forget(key)
        if verdict.kind in ("deleted", "empty"):
            self.ledger.pop(verdict.annotation_id, None)
        else:
            self.ledger[verdict.annotation_id] = verdict.ledger_entry()
        if isinstance(model, AbnormalMemory):
            for image in {verdict.image, before["image"] if before else ""} - {""}:
                changed |= self._follow_normal(model, image)
        self._save()
        return changed

    def _follow_normal(self, model: AbnormalMemory, image: str) -> bool:
        """An image is normal evidence while every verdict on it says normal (one that another
        annotator saw a defect on must not make its defect look normal); returns whether that changed."""
        key = self.normal_key(image)
        entries = [e for e in self.ledger.values() if e["image"] == image]
        if entries and all(e["kind"] == "normal" for e in entries):
            if key in model.normal_evidence:
                return False
            e = entries[0]
            verdict = Verdict(e["annotation_id"], e["task_id"], image, e["category"], "normal", e.get("source", ""))
            model.confirm_normal(Provenance(key, image, e["category"], "good"), self.load_image(verdict))
            return True
        return model.forget(key)

    def labeled_images(self) -> dict[str, list[dict]]:
        """Images annotators agree on, by label: {"normal": [...], "defective": [...]} of {"source",
        "category", "image"}, once each, for the retraining (``image``, the task's image URL, is
        what decides whether a label is held back). Defective: a mask or an "anomalous" choice.

        An image with verdicts of both labels (annotators disagree) is left out of both."""
        kinds: dict[str, set[str]] = {}
        entry: dict[str, dict] = {}
        for e in self.ledger.values():
            if e["kind"] in ("normal", "mask", "anomalous"):
                src = e.get("source") or e["image"]  # ledgers written before tasks carried their source
                kinds.setdefault(src, set()).add("normal" if e["kind"] == "normal" else "defective")
                entry[src] = {"source": src, "category": e["category"], "image": e["image"]}
        out: dict[str, list[dict]] = {"normal": [], "defective": []}
        for src in sorted(kinds):
            if len(kinds[src]) == 1:
                out[next(iter(kinds[src]))].append(entry[src])
        return out

    def _save(self) -> None:
        self.ledger_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.ledger_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.ledger, indent=1))
        os.replace(tmp, self.ledger_path)

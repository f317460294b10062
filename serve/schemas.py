"""Request and response bodies of the scoring API (pydantic: validation and the OpenAPI docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ImageRef(BaseModel):
    uri: str = Field(description="s3://bucket/key, or a local path below the service's allowed_roots")
    category: str | None = Field(None, description="product category: selects the calibrated threshold")
    name: str | None = None


class ScoreRequest(BaseModel):
    images: list[ImageRef] = Field(min_length=1)


class Mask(BaseModel):
    format: Literal["rle"] = "rle"
    rle: list[int] = Field(description="Label Studio brush RLE over the image's H x W x 4 RGBA array")
    width: int
    height: int
    pixels: int = Field(description="number of pixels predicted defective")


class ImageScore(BaseModel):
    name: str
    category: str | None
    score: float = Field(description="anomaly score (higher = more anomalous): the mean of the most "
                                     "anomalous 32 px window (at 256 px) of the smoothed map")
    normalised_score: float = Field(description="score mapped to (0, 1) with the category threshold at 0.5")
    threshold: float | None
    threshold_of: Literal["category", "all categories"] = Field(
        description="whose threshold decided: the image's category, or (a category the model has no "
                    "thresholds for, or none given) the one set over all categories")
    decision: Literal["normal", "anomalous", "unknown"]
    model_version: str = Field(description="the model version that scored it (e.g. v0003)")
    bank_version: str = Field(description="the abnormal-bank update in force (b0000: the bank it was trained with)")
    width: int
    height: int
    heatmap_png: str | None = Field(None, description="base64 PNG, jet colours, pixel threshold at mid-scale")
    mask: Mask | None = None


class ScoreResponse(BaseModel):
    model_version: str
    bank_version: str
    results: list[ImageScore]


class ModelInfo(BaseModel):
    model_version: str
    bank_version: str
    kind: str
    backbone: str
    image_size: int
    categories: list[str]
    normal_bank_size: int
    abnormal_bank_size: int
    abnormal_annotations: int
    normal_evidence_images: int = Field(description="pool images confirmed normal since the version's training, "
                                                    "read beside its normal bank")
    thresholds: dict[str, float]
    loaded_at: float
    reload_error: str | None
    peak_memory_mb: float = Field(description="the replica's peak resident memory since it started")


class CategoryMemory(BaseModel):
    normal: int = Field(description="normal-bank entries of the category, and its confirmed normals' evidence")
    abnormal: int = Field(description="abnormal-bank entries (confirmed and synthetic defects)")


class BanksInfo(BaseModel):
    model_version: str
    bank_version: str = Field(description="the abnormal-bank update served (b0000: the bank it was trained with)")
    categories: dict[str, CategoryMemory]
    pending_events: int | None = Field(None, description="webhook events not applied yet (null: no live loop)")
    quarantined: int = Field(0, description="annotations and events that could not be applied")
    quarantine: list[dict] = Field(default_factory=list, description="what was quarantined, and why")
    retraining: dict | None = Field(None, description="the last retraining: state, trigger, reason, scores")
    loop: dict | None = Field(None, description="the live loop's status as of its last turn")

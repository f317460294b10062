"""Features: offline pretrained backbones and patch embedding."""

from defectloop.features.backbones import KNOWN_BACKBONES, FeatureBackbone, load_backbone, pretrained_model
from defectloop.features.embedding import (
           Extracted,
           PatchEmbedder,
           extract,
           image_tensor,
           mask_cells,
           mask_tensor,
)

__all__ = ["KNOWN_BACKBONES", "Extracted", "FeatureBackbone", "PatchEmbedder", "extract", "image_tensor",
           "load_backbone", "mask_cells", "mask_tensor", "pretrained_model"]

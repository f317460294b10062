"""Features: offline pretrained backbones and patch embedding."""

from defectloop.features.backbones import KNOWN_BACKBONES, FeatureBackbone, load_backbone, pretrained_model
from defectloop.features.embedding import (
           Extracted,
           PatchEmbedder,
           extract,
           feature_buffer,
           image_tensor,
           mask_cells,
           mask_tensor,
           tile_mask_tensors,
           tile_tensors,
)

__all__ = ["KNOWN_BACKBONES", "Extracted", "FeatureBackbone", "PatchEmbedder", "extract", "feature_buffer", "image_tensor",
           "load_backbone", "mask_cells", "mask_tensor", "pretrained_model", "tile_mask_tensors",
           "tile_tensors"]

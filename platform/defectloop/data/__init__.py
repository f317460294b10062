"""Datasets: robust image loading, MVTec-layout readers, semi-supervised splits, synthetic defects."""

from defectloop.data.images import ImageError, ImageTooLarge, load_image, load_mask, read_image, reduction
from defectloop.data.mvtec import Sample, Split, list_categories, load_split, read_category

__all__ = ["ImageError", "ImageTooLarge", "Sample", "Split", "list_categories", "load_image", "load_mask", "load_split",
           "read_category", "read_image", "reduction"]

"""Robust image and mask loading.

Inspection images arrive in every shape: grey, RGB, RGBA, palette, 16-bit TIFF/PNG, JPEG, BMP.
Everything becomes an RGB uint8 array here, upright as its EXIF orientation says, and anything
unreadable raises :class:`ImageError` naming the file (a corrupt chunk CRC, an animated or
multi-page image included), so that a training run can report what it skipped and a service can
answer 4xx.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Largest image accepted by default (decompression-bomb guard); 50 MP covers line-scan cameras.
DEFAULT_MAX_PIXELS = 50_000_000

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageError(ValueError):
    """An image or mask that cannot be used, with the file (or source) it came from."""

    def __init__(self, source: str | os.PathLike, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


class ImageTooLarge(ImageError):
    """An image over the pixel limit (a service answers 413, not 400)."""


def _open(source: str | os.PathLike | bytes, max_pixels: int) -> tuple[Image.Image, str]:
    name = "<bytes>" if isinstance(source, bytes | bytearray) else str(source)
    if isinstance(source, bytes | bytearray):
        if not source:
            raise ImageError(name, "empty file (0 bytes)")
        fp = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(name, "no such file")
        if path.stat().st_size == 0:
            raise ImageError(name, "empty file (0 bytes)")
        fp = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
            w, h = img.size  # from the header: nothing is decoded yet
            if w * h > max_pixels:
                raise ImageTooLarge(name, f"image too large: {w}x{h} = {w * h} pixels > limit {max_pixels}")
            frames = getattr(img, "n_frames", 1)
            if frames > 1 and img.format != "MPO":  # MPO: a camera JPEG with previews; its first frame is the photo
                raise ImageError(name, f"{frames} frames (an animated or multi-page {img.format}): send one image per frame")
            if img.format == "PNG":  # Pillow decodes a PNG without checking its chunks' CRCs: verify first
                img.verify()
                if isinstance(fp, io.BytesIO):
                    fp.seek(0)
                img = Image.open(fp)
            img.load()
            img = ImageOps.exif_transpose(img)  # the camera's orientation, as a browser (and Label Studio) shows it
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(name, f"image too large ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageError(name, f"not a readable image ({type(e).__name__}: {e})") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageError(name, f"corrupt or truncated image ({e})") from e
    return img, name


def to_rgb_array(img: Image.Image, name: str = "<image>") -> np.ndarray:
    """Convert any PIL mode to an H x W x 3 uint8 array (16-bit and float images are rescaled)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img).astype(np.float64)
        if mode == "F":
            lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
            a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        elif mode.startswith("I;16") or a.max() > 255:
            a = a / 257.0
        grey = np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode in ("RGB",):
        return np.asarray(img, dtype=np.uint8).copy()
    if mode in ("L", "1", "P", "LA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "PA", "La", "RGBa", "RGBX"):
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    raise ImageError(name, f"unsupported image mode {mode!r}")


def load_image(source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file (or its bytes) as an H x W x 3 uint8 RGB array."""
    img, name = _open(source, max_pixels)
    try:
        return to_rgb_array(img, name)
    finally:
        img.close()


def reduction(width: int, height: int, model_size: int) -> int:
    """The integer factor an image is box-reduced by before it is resized to a model's input size:
    1 below 8 x that size, else the factor that brings its longest side to 4-6 x that size.

    The model sees ``model_size`` pixels a side whatever the camera gives, so a 49 MP image needs
    not become a full-size array on its way there (3 bytes a pixel, and more in floats). The same
    factor applied to an image already reduced is 1: reading reduced and resizing the full image
    give the same model input (``features.image_tensor`` applies it too)."""
    k = max(width, height) // (4 * model_size)
    return k if k >= 2 else 1


def read_image(source: str | os.PathLike | bytes, model_size: int,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """Read an image for a model of input ``model_size``: reduced by ``reduction`` (before it is
    converted, where Pillow can reduce its mode), with its original (width, height)."""
    img, name = _open(source, max_pixels)
    size = img.size
    k = reduction(*size, model_size)
    try:
        if k > 1 and img.mode in ("RGB", "L", "RGBA", "LA"):
            img = img.reduce(k)
            return to_rgb_array(img, name), size
        arr = to_rgb_array(img, name)
    finally:
        img.close()
    return (np.asarray(Image.fromarray(arr).reduce(k)) if k > 1 else arr), size


def load_mask(source: str | os.PathLike | bytes, expected_hw: tuple[int, int] | None = None,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a defect mask as an H x W bool array (any non-zero pixel is defective)."""
    img, name = _open(source, max_pixels)
    try:
        a = np.asarray(img.convert("L") if img.mode not in ("L", "1", "I;16", "I", "F") else img)
    finally:
        img.close()
    if a.ndim != 2:
        a = a[..., 0]
    mask = a > 0
    if expected_hw is not None and mask.shape != tuple(expected_hw):
        raise ImageError(name, f"mask size {mask.shape[1]}x{mask.shape[0]} differs from its image "
                               f"{expected_hw[1]}x{expected_hw[0]}")
    return mask

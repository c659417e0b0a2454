"""Robust image reading: any PNG/JPEG/TIFF mode (RGBA, grayscale, 16-bit) to uint8 RGB, or a named error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class BadImageError(ValueError):
    """An image file that cannot be read; the message names the file."""


def read_rgb(path: Path) -> np.ndarray:
    """Read an image as H x W x 3 uint8 RGB (alpha dropped, gray replicated, 16-bit scaled)."""
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb8(img)
    except FileNotFoundError:
        raise BadImageError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadImageError(f"{path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def _to_rgb8(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        gray = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "RGBA" or img.mode == "LA" or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA").convert("RGB")
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
        raise ValueError(f"unexpected image shape {arr.shape}")
    return arr


def to_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to size (bilinear), then centre-crop to size x size."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(resized[top : top + size, left : left + size])

"""Fetch and decode one image, once: EXIF orientation applied, grayscale / palette / RGBA / 16-bit converted to
8-bit RGB, a pixel-count limit checked from the header before any pixel is decoded, an upper side bound enforced by
resizing. Every failure is a DecodeError with a clear message. Used by the segmentation job and by training.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from . import storage

# Never accept silently-truncated files: a truncated image is an error row, not half an image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class DecodeError(ValueError):
    def __init__(self, message: str, stage: str):
        super().__init__(message)
        self.stage = stage


def fetch(uri: str) -> bytes:
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise DecodeError(f"image not found: {uri}", "read") from e
    except OSError as e:
        raise DecodeError(f"cannot read image {uri}: {e}", "read") from e
    if not raw:
        raise DecodeError(f"image file is empty (0 bytes): {uri}", "decode")
    return raw


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) * (255.0 / (hi - lo))
        im = Image.fromarray(a.astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def _declared_size(raw: bytes) -> tuple[int, int] | None:
    """(w, h) from a PNG or GIF header, which PIL refuses to open at all when a side is 0."""
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) >= 24 and raw[12:16] == b"IHDR":
        return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    if raw[:6] in (b"GIF87a", b"GIF89a") and len(raw) >= 10:
        return int.from_bytes(raw[6:8], "little"), int.from_bytes(raw[8:10], "little")
    return None


def decode(
    raw: bytes, uri: str = "", max_side: int = 0, max_pixels: int = 0
) -> tuple[np.ndarray, tuple[int, int]]:
    """bytes -> ((h, w, 3) uint8 RGB image, bounded by ``max_side``; (H, W) original size after EXIF rotation).

    ``max_pixels`` > 0: an image with more pixels is refused from its header alone (no pixel is decoded), with a
    DecodeError naming the limit ``limits.max_image_pixels`` and the image's size."""
    declared = _declared_size(raw)
    if declared and 0 in declared:
        raise DecodeError(f"zero-size image ({declared[0]}x{declared[1]}): {uri}", "decode")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw))
            if max_pixels and im.size[0] * im.size[1] > max_pixels:
                raise DecodeError(
                    f"image is {im.size[0]}x{im.size[1]} = {im.size[0] * im.size[1]} pixels, over "
                    f"limits.max_image_pixels={max_pixels}: {uri}",
                    "limit",
                )
            im.load()
    except DecodeError:
        raise
    except UnidentifiedImageError as e:
        raise DecodeError(f"not an image file (unrecognised format): {uri}", "decode") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DecodeError(f"unreadable or truncated image {uri}: {e}", "decode") from e
    except Image.DecompressionBombWarning as e:
        raise DecodeError(f"image too large to decode safely {uri}: {e}", "decode") from e
    im = ImageOps.exif_transpose(im)
    w, h = im.size
    if w == 0 or h == 0:
        raise DecodeError(f"zero-size image ({w}x{h}): {uri}", "decode")
    im = _to_rgb(im)
    if max_side and max(w, h) > max_side:
        s = max_side / max(w, h)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8), (h, w)

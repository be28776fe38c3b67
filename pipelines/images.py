"""Reading one image file: the decode every path shares, its cheap check, and its error.

The converter, the folder loader, the labelled (eval) sets and DALI's verified file list all read
images through here, so a rule about what an image file may hold (its mode, a truncated stream)
is written once. Every image comes out as RGB: CMYK and grayscale JPEGs, palette or alpha PNGs and
the PNG saved as .JPEG that ImageNet contains are converted; a 16-bit PNG is scaled to 8 bits.
EXIF orientation is ignored on purpose: the stored pixels are used, as torchvision's loader and the
official BYOL input pipeline (TF's decode_jpeg) use them, and DALI's decoder is told the same.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


class BadImageError(OSError):
    """An image file that cannot be read or decoded; the message names the file. One class for the
    converter, the folder loader and DALI's verified file list, so one `except` catches them all."""


class BadImageWarning(UserWarning):
    """A bad image was skipped, by path (data.on_bad_image: skip)."""


def decode_rgb(path: str, max_side: int | None = None) -> Image.Image:
    """The image at `path` fully decoded as RGB, or BadImageError naming the file.

    With max_side, a JPEG at least twice that size is decoded at a reduced DCT scale (1/2, 1/4,
    1/8) that keeps its long side >= max_side: a caller that downsizes to max_side anyway (the
    converter) then reads large JPEGs several times cheaper.
    """
    try:
        with Image.open(path) as image:
            if max_side and image.format == "JPEG" and max(image.size) >= 2 * max_side:
                s = max_side / max(image.size)
                image.draft(None, (math.ceil(image.width * s), math.ceil(image.height * s)))
            return eight_bit(image).convert("RGB")  # convert() forces the full decode: truncation fails here
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError... for broken files
        raise BadImageError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from err


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # how PIL opens a 16-bit grayscale PNG


def eight_bit(image: Image.Image) -> Image.Image:
    """`image` with 8 bits per channel. PIL opens a 16-bit grayscale PNG in mode I;16 (or I), whose
    convert("RGB") clips every value above 255: nearly all white. It is scaled instead, v * 255 /
    65535 rounded, as DALI's decoder does. (PIL reads 16-bit RGB(A) PNGs as 8-bit already.)"""
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
    return Image.fromarray(np.round(values * (255 / 65535)).astype(np.uint8), "L")


def load_rgb(path: str, max_side: int | None = None) -> np.ndarray:
    """`decode_rgb` as an (H, W, 3) uint8 array."""
    return np.asarray(decode_rgb(path, max_side))


def check_image(path: str) -> str | None:
    """None when the file decodes as an image, else the reason. JPEGs are decoded at 1/8 scale:
    the entropy-coded data is still read to the end (so truncation is caught) at ~1/10 the cost."""
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft(None, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        return None
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError... for broken files
        return f"{type(err).__name__}: {err}"


__all__ = ["BadImageError", "BadImageWarning", "SIXTEEN_BIT_MODES", "check_image", "decode_rgb", "eight_bit", "load_rgb"]

"""Reading one image file: the decode every path shares, its cheap check, and its error.

The converter, the folder loader, the labelled (eval) sets and DALI's verified file list all read
images through here, so a rule about what an image file may hold (its mode, a truncated stream)
is written once. Every image comes out as RGB: CMYK and grayscale JPEGs, palette or alpha PNGs and
the PNG saved as .JPEG that ImageNet contains are converted.
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
            return image.convert("RGB")  # convert() forces the full decode: truncation fails here
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError... for broken files
        raise BadImageError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from err


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


__all__ = ["BadImageError", "BadImageWarning", "check_image", "decode_rgb", "load_rgb"]

"""FFCV decoder operation: decode each image of the `image` field once, cut two random resized crops.

FFCV 1.0.2 cannot read one field twice, so one operation makes both views: it decodes the JPEG
(FFCV's turbojpeg path) or reads the raw pixels into a scratch buffer, then resizes two crop
boxes into an output of shape (2, S, S, 3) uint8 per sample. Flips and colour happen later, on
the device (pipelines.gpu_augment).

Crop boxes follow pipelines.crops.sample_crop (the official sampler, or torchvision's), but their
random numbers come from a counter-based generator (splitmix64) keyed by (epoch key, sample
index, view): a box does not depend on the thread, the batch or the worker count. The epoch key
lives in a one-element array that the compiled code reads through its address, so it can change
every epoch without recompiling. The resize is Pillow's antialiased bicubic, reimplemented here
(interpolation "cubic", the folder backend's pixels), or FFCV's OpenCV INTER_AREA ("area": faster,
but nearest-neighbour-like where a crop is enlarged).

This module imports ffcv at load: import it only after checking that ffcv is installed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.state import State

ATTEMPTS = 10  # torchvision's tries before the center-crop fallback
INTERPOLATIONS = ("cubic", "area")  # Pillow's antialiased bicubic (as the folder path) | OpenCV INTER_AREA
DRAWS = 4 * ATTEMPTS  # uniforms per box: area, log-ratio, top, left for each try

_KEEP_ALIVE: list = []  # see TwoCropDecoder.generate_code

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@intrinsic
def _u64_pointer(typingctx, address):
    """An integer address as a uint64* (to read an array that numba must not freeze)."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return types.CPointer(types.uint64)(types.uintp), codegen


@numba.njit(inline="always")
def _mix(z):
    """splitmix64's finalizer: a bijection of uint64 with good avalanche."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@numba.njit
def fill_uniforms(key, index, view, out):
    """out[i] ~ U[0, 1), a pure function of (key, index, view, i): splitmix64 streams."""
    state = _mix(key ^ _mix(np.uint64(index) * _GOLDEN + np.uint64(view)))
    for i in range(out.shape[0]):
        state += _GOLDEN
        out[i] = (_mix(state) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit
def official_crop_from_uniforms(u, height, width, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi):
    """The official sampler's box (top, left, h, w) from u[0:4]: one draw of area and log aspect
    ratio, w and h clamped into the image, then the position (as pipelines.crops.sample_crop)."""
    target_area = height * width * (scale_lo + (scale_hi - scale_lo) * u[0])
    aspect = np.exp(log_ratio_lo + (log_ratio_hi - log_ratio_lo) * u[1])
    w = min(width, max(1, int(round(np.sqrt(target_area * aspect)))))
    h = min(height, max(1, int(round(np.sqrt(target_area / aspect)))))
    top = int(np.floor(u[2] * (height - h + 1)))
    left = int(np.floor(u[3] * (width - w + 1)))
    return top, left, h, w


@numba.njit
def crop_from_uniforms(u, height, width, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi):
    """torchvision's RandomResizedCrop box (top, left, h, w) from DRAWS uniforms in [0, 1).

    Try i uses u[4i] for the area fraction, u[4i+1] for the log aspect ratio, u[4i+2] and
    u[4i+3] for the position: the same algorithm as pipelines.crops.sample_crop.
    """
    area = height * width
    for i in range(ATTEMPTS):
        target_area = area * (scale_lo + (scale_hi - scale_lo) * u[4 * i])
        aspect = np.exp(log_ratio_lo + (log_ratio_hi - log_ratio_lo) * u[4 * i + 1])
        w = int(round(np.sqrt(target_area * aspect)))
        h = int(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(np.floor(u[4 * i + 2] * (height - h + 1)))
            left = int(np.floor(u[4 * i + 3] * (width - w + 1)))
            return top, left, h, w
    ratio_lo, ratio_hi = np.exp(log_ratio_lo), np.exp(log_ratio_hi)
    in_ratio = width / height
    if in_ratio < ratio_lo:  # too tall: keep the full width
        w = width
        h = min(height, max(1, int(round(w / ratio_lo))))
    elif in_ratio > ratio_hi:  # too wide: keep the full height
        h = height
        w = min(width, max(1, int(round(h * ratio_hi))))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# ---------------------------------------------------------------- PIL's antialiased bicubic, in numba
# Pillow's ImagingResample (libImaging/Resample.c) with its bicubic filter (a = -0.5): support
# widened by the shrink factor (antialiasing), 22-bit fixed-point weights, a horizontal then a
# vertical pass through a uint8 image. The folder backend's crop(...).resize(..., BICUBIC) is
# this, so both backends make the same pixels from the same crop box.

_PRECISION_BITS = 32 - 8 - 2


@numba.njit(inline="always")
def _bicubic(x):
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@numba.njit
def _coefficients(in_size, out_size):
    """(xmin, count, weights) per output pixel: Pillow's precompute_coeffs + normalize_coeffs_8bpc."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    bounds = np.zeros((out_size, 2), np.int64)
    weights = np.zeros((out_size, ksize), np.int64)
    k = np.zeros(ksize)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        total = 0.0
        for x in range(xmax):
            k[x] = _bicubic((x + xmin - center + 0.5) / filterscale)
            total += k[x]
        for x in range(xmax):
            w = k[x] / total if total != 0.0 else k[x]
            weights[xx, x] = int(w * (1 << _PRECISION_BITS) + (-0.5 if w < 0 else 0.5))
        bounds[xx, 0], bounds[xx, 1] = xmin, xmax
    return bounds, weights


@numba.njit(inline="always")
def _clip8(acc):
    v = acc >> _PRECISION_BITS
    return 0 if v < 0 else (255 if v > 255 else v)


@numba.njit
def _resample_rows(src, dst):
    """dst (h, out_w, 3) = each row of src (h, w, 3) resampled to out_w pixels (horizontal pass)."""
    bounds, weights = _coefficients(src.shape[1], dst.shape[1])
    half = 1 << (_PRECISION_BITS - 1)
    for y in range(src.shape[0]):
        row = src[y]
        for xx in range(dst.shape[1]):
            xmin, n = bounds[xx, 0], bounds[xx, 1]
            r = g = b = half
            for x in range(n):
                wt = weights[xx, x]
                r += np.int64(row[xmin + x, 0]) * wt
                g += np.int64(row[xmin + x, 1]) * wt
                b += np.int64(row[xmin + x, 2]) * wt
            dst[y, xx, 0], dst[y, xx, 1], dst[y, xx, 2] = _clip8(r), _clip8(g), _clip8(b)


@numba.njit
def _resample_columns(src, dst):
    """dst (out_h, w, 3) = each column of src (h, w, 3) resampled to out_h pixels (vertical pass);
    whole rows are accumulated at a time, so memory is read in order."""
    bounds, weights = _coefficients(src.shape[0], dst.shape[0])
    half = 1 << (_PRECISION_BITS - 1)
    width = src.shape[1]
    acc = np.empty((width, 3), np.int64)
    for yy in range(dst.shape[0]):
        ymin, n = bounds[yy, 0], bounds[yy, 1]
        acc[:] = half
        for y in range(n):
            wt = weights[yy, y]
            row = src[ymin + y]
            for xx in range(width):
                for c in range(3):
                    acc[xx, c] += np.int64(row[xx, c]) * wt
        for xx in range(width):
            for c in range(3):
                dst[yy, xx, c] = _clip8(acc[xx, c])


@numba.njit
def resize_crop_bicubic(image, top, bottom, left, right, destination):
    """image[top:bottom, left:right] (H, W, 3 uint8) resized into destination (S, S, 3), as
    Pillow's Image.crop(box).resize((S, S), BICUBIC) does (Pillow 13: of two passes, the one that
    leaves the smaller intermediate image runs first)."""
    crop = image[top:bottom, left:right]
    h, w = bottom - top, right - left
    out_h, out_w = destination.shape[0], destination.shape[1]
    if w != out_w and h != out_h:
        if out_h * w < h * out_w:
            temp = np.empty((out_h, w, 3), np.uint8)
            _resample_columns(crop, temp)
            _resample_rows(temp, destination)
        else:
            temp = np.empty((h, out_w, 3), np.uint8)
            _resample_rows(crop, temp)
            _resample_columns(temp, destination)
    elif w != out_w:
        _resample_rows(crop, destination)
    elif h != out_h:
        _resample_columns(crop, destination)
    else:
        destination[:, :, :] = crop
    return destination


class TwoCropDecoder(SimpleRGBImageDecoder):
    """Decoder for ffcv's RGBImageField: (B,) sample indices -> (B, 2, S, S, 3) uint8 crops.

    scales, ratios: per view, (lo, hi) of the crop area fraction and of the aspect ratio w / h.
    Call set_epoch_key(k) before iterating an epoch: crop boxes are a function of (k, sample
    index, view). A subclass of the field's decoder class, so that FFCV's pipeline takes it as
    the decoder of the `image` field rather than as a transform after the default one.
    """

    def __init__(self, size: int, scales: tuple[tuple[float, float], tuple[float, float]],
                 ratios: tuple[tuple[float, float], tuple[float, float]], crop_sampler: str = "official",
                 interpolation: str = "cubic") -> None:
        super().__init__()
        if crop_sampler not in ("official", "torchvision"):
            raise ValueError(f"crop_sampler = {crop_sampler!r}: expected official or torchvision")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"data.ffcv.interpolation = {interpolation!r}: expected {' or '.join(INTERPOLATIONS)}")
        self.crop_sampler, self.interpolation = crop_sampler, interpolation
        self.size = int(size)
        self.scales = np.array(scales, dtype=np.float64).reshape(2, 2)
        self.log_ratios = np.log(np.array(ratios, dtype=np.float64).reshape(2, 2))
        # Read by the compiled code through its address: it must live as long as this object.
        self._key = np.zeros(1, dtype=np.uint64)

    def set_epoch_key(self, key: int) -> None:
        self._key[0] = np.uint64(key & 0xFFFFFFFFFFFFFFFF)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        widths, heights = self.metadata["width"], self.metadata["height"]
        # uint64: the product overflows uint16 metadata
        scratch = np.uint64(heights.max()) * np.uint64(widths.max()) * np.uint64(3)
        out_shape = (2, self.size, self.size, 3)
        u8 = np.dtype("<u1")
        return (
            replace(previous_state, jit_mode=True, shape=out_shape, dtype=u8),
            (AllocationQuery(out_shape, u8), AllocationQuery((scratch,), u8)),
        )

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        # One dispatcher per decoder, as FFCV's decoders do: sharing one between loaders
        # breaks numba 0.68's bookkeeping of compiled overloads (KeyError when compiling).
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        # Never collected: numba 0.68's finalizer of a dispatcher compiled for literal arguments
        # raises KeyError (printed as an ignored exception) when a loader is freed.
        _KEEP_ALIVE.append((imdecode_c, resize_crop_c))
        key_address = self._key.ctypes.data
        scales, log_ratios = self.scales.copy(), self.log_ratios.copy()
        crop_box = official_crop_from_uniforms if self.crop_sampler == "official" else crop_from_uniforms
        resize = resize_crop_c if self.interpolation == "area" else resize_crop_bicubic

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, scratch = my_storage
            key = numba.carray(_u64_pointer(key_address), 1)[0]
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    buffer = scratch[dst_ix]
                    imdecode_c(image_data, buffer, height, width, height, width, 0, 0, 1, 1,
                               False, False)
                    image = buffer[: 3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                u = np.empty(DRAWS, dtype=np.float64)
                for view in range(2):
                    fill_uniforms(key, source_ix, view, u)
                    top, left, h, w = crop_box(
                        u, int(height), int(width), scales[view, 0], scales[view, 1],
                        log_ratios[view, 0], log_ratios[view, 1])
                    resize(image, top, top + h, left, left + w, destination[dst_ix, view])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode

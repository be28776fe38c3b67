"""FFCV decoder operation: decode each image of the `image` field once, cut two random resized crops.

FFCV 1.0.2 cannot read one field twice, so one operation makes both views: it decodes the JPEG
(FFCV's turbojpeg path) or reads the raw pixels into a scratch buffer, then resizes two crop
boxes into an output of shape (2, S, S, 3) uint8 per sample. Flips and colour happen later, on
the device (pipelines.gpu_augment).

Crop boxes follow pipelines.crops.sample_crop (the official sampler, or torchvision's), but their
random numbers come from a counter-based generator (splitmix64) keyed by (epoch key, sample
index, view): a box does not depend on the thread, the batch or the worker count. The epoch key
lives in a one-element array that the compiled code reads through its address, so it can change
every epoch without recompiling. The resize is FFCV's (OpenCV INTER_AREA), not the paper's
bicubic.

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


class TwoCropDecoder(SimpleRGBImageDecoder):
    """Decoder for ffcv's RGBImageField: (B,) sample indices -> (B, 2, S, S, 3) uint8 crops.

    scales, ratios: per view, (lo, hi) of the crop area fraction and of the aspect ratio w / h.
    Call set_epoch_key(k) before iterating an epoch: crop boxes are a function of (k, sample
    index, view). A subclass of the field's decoder class, so that FFCV's pipeline takes it as
    the decoder of the `image` field rather than as a transform after the default one.
    """

    def __init__(self, size: int, scales: tuple[tuple[float, float], tuple[float, float]],
                 ratios: tuple[tuple[float, float], tuple[float, float]], crop_sampler: str = "official") -> None:
        super().__init__()
        if crop_sampler not in ("official", "torchvision"):
            raise ValueError(f"crop_sampler = {crop_sampler!r}: expected official or torchvision")
        self.crop_sampler = crop_sampler
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
                    resize_crop_c(image, top, top + h, left, left + w, destination[dst_ix, view])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode

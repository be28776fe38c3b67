"""The BYOL augmentation policy as data: one `ViewPolicy` per view, shared by every backend.

The defaults are the paper's T (view 1) and T' (view 2), with the official code's semantics
(deepmind-research byol/utils/augmentations.py), spelled out in DESIGN.md:
brightness is additive, contrast is per channel, saturation and hue act in HSV, each jitter op
is followed by a clip to [0, 1], the blur is zero-padded, solarize maps x >= threshold to 1 - x.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.crops import CROP_SAMPLERS
from pipelines.params import at_least, check_fields, choice, in_range, param

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
PROBABILITY = "a probability in [0, 1]"
STRENGTH = "a strength in [0, 1]"


@dataclass
class ViewPolicy:
    """How one view is made from a source image. Probabilities are per image."""

    crop_size: int = at_least(224, 8, "at least 8 pixels")  # output side (pixels) of the random resized crop
    crop_scale: tuple[float, float] = param((0.08, 1.0), lambda v: 0.0 < v[0] <= v[1] <= 1.0, "0 < lo <= hi <= 1")  # crop area as a fraction of the image area
    crop_ratio: tuple[float, float] = param((3 / 4, 4 / 3), lambda v: 0.0 < v[0] <= v[1], "0 < lo <= hi")  # crop aspect ratio range (w / h)
    flip_p: float = in_range(0.5, 0.0, 1.0, PROBABILITY)  # horizontal flip
    jitter_p: float = in_range(0.8, 0.0, 1.0, PROBABILITY)  # apply the four color-jitter ops, in a random order per image
    brightness: float = in_range(0.4, 0.0, 1.0, STRENGTH)  # additive delta ~ U[-b, b]
    contrast: float = in_range(0.4, 0.0, 1.0, STRENGTH)  # factor ~ U[1-c, 1+c] around each channel's spatial mean
    saturation: float = in_range(0.2, 0.0, 1.0, STRENGTH)  # HSV s multiplied by U[1-s, 1+s]
    hue: float = in_range(0.1, 0.0, 0.5, "a strength in [0, 0.5]")  # HSV h shifted by U[-h, h] (mod 1)
    grayscale_p: float = in_range(0.2, 0.0, 1.0, PROBABILITY)  # convert to gray (weights 0.2989, 0.5870, 0.1140)
    blur_p: float = in_range(1.0, 0.0, 1.0, PROBABILITY)  # Gaussian blur (T: 1.0, T': 0.1)
    blur_sigma: tuple[float, float] = param((0.1, 2.0), lambda v: 0.0 < v[0] <= v[1], "0 < lo <= hi")  # sigma ~ U[lo, hi], in pixels
    blur_kernel: int = at_least(0, 0, ">= 0 (0 = auto)")  # 0: image side / 10 rounded to odd (23 at 224)
    solarize_p: float = in_range(0.0, 0.0, 1.0, PROBABILITY)  # solarize (T: 0.0, T': 0.2)
    solarize_threshold: float = 0.5  # x < t ? x : 1 - x

    def kernel_size(self) -> int:
        """Blur kernel side: the official code's 2·⌊k/2⌋+1 with k = side/10 unless set."""
        k = self.blur_kernel or int(self.crop_size / 10)
        return 2 * (k // 2) + 1

    def validate(self, name: str = "view") -> None:
        """Raise ValueError naming the field when a value is out of range."""
        check_fields(self, name)


def view1_policy() -> ViewPolicy:
    """The paper's T: always blurred, never solarized."""
    return ViewPolicy(blur_p=1.0, solarize_p=0.0)


def view2_policy() -> ViewPolicy:
    """The paper's T': rarely blurred, sometimes solarized."""
    return ViewPolicy(blur_p=0.1, solarize_p=0.2)


@dataclass
class AugmentConfig:
    """The asymmetric pair (T, T') and the output normalization, as one config section."""

    view1: ViewPolicy = field(default_factory=view1_policy)
    view2: ViewPolicy = field(default_factory=view2_policy)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel normalization of the views
    std: tuple[float, float, float] = param(IMAGENET_STD, lambda v: all(x > 0 for x in v), "positive values")
    crop_sampler: str = choice("official", CROP_SAMPLERS)  # official (one draw, clamped into the image) / torchvision (10 tries, centre fallback); every backend (folder, ffcv, dali)

    def validate(self) -> None:
        self.view1.validate("augment.view1")
        self.view2.validate("augment.view2")
        if self.view1.crop_size != self.view2.crop_size:
            raise ValueError(
                f"augment.view1.crop_size = {self.view1.crop_size} and augment.view2.crop_size = "
                f"{self.view2.crop_size}: both views must have the same size (one batch per view)"
            )
        check_fields(self, "augment")

    def set_crop_size(self, size: int) -> None:
        self.view1.crop_size = size
        self.view2.crop_size = size

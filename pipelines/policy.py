"""The BYOL augmentation policy as data: one `ViewPolicy` per view, shared by every backend.

The defaults are the paper's T (view 1) and T' (view 2), with the official code's semantics
(deepmind-research byol/utils/augmentations.py), spelled out in DESIGN.md:
brightness is additive, contrast is per channel, saturation and hue act in HSV, each jitter op
is followed by a clip to [0, 1], the blur is zero-padded, solarize maps x >= threshold to 1 - x.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)


@dataclass
class ViewPolicy:
    """How one view is made from a source image. Probabilities are per image."""

    crop_size: int = 224  # output side (pixels) of the random resized crop
    crop_scale: tuple[float, float] = (0.08, 1.0)  # crop area as a fraction of the image area
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio range (w / h)
    flip_p: float = 0.5  # horizontal flip
    jitter_p: float = 0.8  # apply the four color-jitter ops, in a random order per image
    brightness: float = 0.4  # additive delta ~ U[-b, b]
    contrast: float = 0.4  # factor ~ U[1-c, 1+c] around each channel's spatial mean
    saturation: float = 0.2  # HSV s multiplied by U[1-s, 1+s]
    hue: float = 0.1  # HSV h shifted by U[-h, h] (mod 1)
    grayscale_p: float = 0.2  # convert to gray (weights 0.2989, 0.5870, 0.1140)
    blur_p: float = 1.0  # Gaussian blur (T: 1.0, T': 0.1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # sigma ~ U[lo, hi], in pixels
    blur_kernel: int = 0  # 0: image side / 10 rounded to odd (23 at 224)
    solarize_p: float = 0.0  # solarize (T: 0.0, T': 0.2)
    solarize_threshold: float = 0.5  # x < t ? x : 1 - x

    def kernel_size(self) -> int:
        """Blur kernel side: the official code's 2·⌊k/2⌋+1 with k = side/10 unless set."""
        k = self.blur_kernel or int(self.crop_size / 10)
        return 2 * (k // 2) + 1

    def validate(self, name: str = "view") -> None:
        """Raise ValueError naming the field when a value is out of range."""
        for f in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            v = getattr(self, f)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}.{f} = {v}: expected a probability in [0, 1]")
        for f in ("brightness", "contrast", "saturation"):
            v = getattr(self, f)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}.{f} = {v}: expected a strength in [0, 1]")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"{name}.hue = {self.hue}: expected a strength in [0, 0.5]")
        if self.crop_size < 8:
            raise ValueError(f"{name}.crop_size = {self.crop_size}: expected at least 8 pixels")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"{name}.crop_scale = {self.crop_scale}: expected 0 < lo <= hi <= 1")
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"{name}.crop_ratio = {self.crop_ratio}: expected 0 < lo <= hi")
        lo, hi = self.blur_sigma
        if not 0.0 < lo <= hi:
            raise ValueError(f"{name}.blur_sigma = {self.blur_sigma}: expected 0 < lo <= hi")
        if self.blur_kernel < 0:
            raise ValueError(f"{name}.blur_kernel = {self.blur_kernel}: expected >= 0 (0 = auto)")


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
    std: tuple[float, float, float] = IMAGENET_STD
    crop_sampler: str = "official"  # official (one draw, clamped into the image) / torchvision (10 tries, centre fallback); every backend (folder, ffcv, dali)

    def validate(self) -> None:
        self.view1.validate("augment.view1")
        self.view2.validate("augment.view2")
        if self.view1.crop_size != self.view2.crop_size:
            raise ValueError(
                f"augment.view1.crop_size = {self.view1.crop_size} and augment.view2.crop_size = "
                f"{self.view2.crop_size}: both views must have the same size (one batch per view)"
            )
        if self.crop_sampler not in ("official", "torchvision"):
            raise ValueError(f"augment.crop_sampler = {self.crop_sampler!r}: expected official or torchvision")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"augment.std = {self.std}: expected positive values")

    def set_crop_size(self, size: int) -> None:
        self.view1.crop_size = size
        self.view2.crop_size = size

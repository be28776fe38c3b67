"""Check an installed, auditwheel-repaired FFCV wheel without torch: its C extension loads with the
libraries it vendors alone, decodes a JPEG like Pillow does and resizes a crop like OpenCV does.

    python tools/check_ffcv_wheel.py SITE_DIR      # SITE_DIR: where `pip install --target` put ffcv

Run by tools/wheelhouse.sh in a fresh Python 3.12 with numpy, numba, opencv-python-headless and
pillow from PyPI (what a GPU node has). `import ffcv` itself needs torch, so the extension is
opened with ctypes, as ffcv/libffcv.py does. Exit 0 and a summary, or 1 and what failed.
"""

from __future__ import annotations

import ctypes
import io
import subprocess
import sys
from pathlib import Path

import cv2  # first, as on the node: opencv-python-headless's own OpenCV is then already loaded
import numpy as np
from PIL import Image

# What a manylinux wheel may take from the system (glibc and the compiler runtime).
BASE = ("libc.so", "libm.so", "libpthread.so", "libdl.so", "librt.so", "libutil.so", "ld-linux-x86-64.so",
        "libstdc++.so", "libgcc_s.so", "linux-vdso.so")


def photo(height: int, width: int) -> np.ndarray:
    """A smooth colour image with edges (JPEG-friendly, unlike noise), uint8 HxWx3."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(x / 17), 128 + 100 * np.cos(y / 23), (x + y) % 256], axis=-1)
    img[height // 3: height // 2, width // 4: width // 2] = (250, 40, 30)
    return np.clip(img, 0, 255).astype(np.uint8)


def main(site: Path) -> int:
    ext = next(site.glob("ffcv/_libffcv*.so"))
    ldd = subprocess.run(["ldd", str(ext)], capture_output=True, text=True, check=True).stdout
    outside = [line.strip() for line in ldd.splitlines()
               if "=>" in line and "ffcv.libs" not in line and not line.strip().startswith(BASE)]
    if outside or "not found" in ldd:
        print("ffcv wheel: libraries from outside the wheel:\n  " + "\n  ".join(outside), file=sys.stderr)
        return 1
    lib = ctypes.CDLL(str(ext))

    src = photo(120, 160)
    buf = io.BytesIO()
    Image.fromarray(src).save(buf, format="JPEG", quality=95)
    jpeg = np.frombuffer(buf.getvalue(), dtype=np.uint8)
    out = np.zeros((120, 160, 3), dtype=np.uint8)
    lib.imdecode.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p,
                             ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32,
                             ctypes.c_uint32, ctypes.c_bool, ctypes.c_bool]
    code = lib.imdecode(jpeg.ctypes.data, jpeg.size, 120, 160, out.ctypes.data, 120, 160, 0, 0, 1, 1, False, False)
    reference = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    decode_err = np.abs(out.astype(int) - reference.astype(int)).mean()
    if code != 0 or decode_err > 2.0:
        print(f"ffcv wheel: imdecode returned {code}, mean |ffcv - Pillow| = {decode_err:.2f}", file=sys.stderr)
        return 1

    crop = np.zeros((32, 48, 3), dtype=np.uint8)
    lib.resize.argtypes = 11 * [ctypes.c_int64]
    lib.resize(0, out.ctypes.data, 120, 160, 10, 90, 20, 140, crop.ctypes.data, 32, 48)
    expected = cv2.resize(np.ascontiguousarray(out[10:90, 20:140]), (48, 32), interpolation=cv2.INTER_AREA)
    resize_err = np.abs(crop.astype(int) - expected.astype(int)).mean()
    if resize_err > 1.0:
        print(f"ffcv wheel: resize differs from cv2.INTER_AREA by {resize_err:.2f} on average", file=sys.stderr)
        return 1
    vendored = sorted(p.name for p in (site / "ffcv.libs").iterdir())
    print(f"ffcv wheel OK: decode within {decode_err:.2f} of Pillow, resize within {resize_err:.2f} of cv2 "
          f"{cv2.__version__}; every library outside glibc/libstdc++ resolves into ffcv.libs ({len(vendored)}):")
    for name in vendored:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))

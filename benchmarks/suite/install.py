"""The offline install: the wheelhouse (tools/wheelhouse.sh) and DALI's parts, into a folder of
their own with `pip install --no-index --no-deps --target`, so the node's torch is never touched.

DALI comes as one tar split into parts of at most 60 MiB (one device command's carry each), brought
over several commands into one folder with SHA256SUMS; it is joined and installed only when every
part is there and every checksum matches.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any


def install(wheelhouse: Path, dali_parts: Path, site: Path) -> dict:
    """pip-install the wheelhouse's wheels (fastbyol's own aside: it runs from this tree) and, when
    every part is present and its checksum matches, DALI's, into `site`, never into the node's Python."""
    result: dict[str, Any] = {"site": str(site), "wheels": [], "dali": None}
    wheels = sorted(w for w in wheelhouse.glob("*.whl") if not w.name.startswith("fastbyol-"))
    if not wheels:
        result["note"] = f"no wheels in {wheelhouse}: the stages use what this Python already has"
    dali = joined_dali(dali_parts, site.parent / "dali")
    result["dali"] = dali["status"]
    wheels += dali.get("wheels", [])
    if wheels and _pip_install(wheels, site):  # one wheel pip refuses (e.g. an older glibc) must not
        failed = {w.name: _pip_install([w], site) for w in wheels}  # cost the others: then one by one
        result["failed"] = {name: error for name, error in failed.items() if error}
    result["wheels"] = [w.name for w in wheels if w.name not in result.get("failed", {})]
    nvidia = site / "nvidia" / "__init__.py"
    if nvidia.exists():
        # DALI's wheels make `nvidia` a regular package; first on PYTHONPATH it would hide the node's
        # own nvidia.* (CUDA libraries). A pkgutil namespace spans every nvidia/ folder on sys.path.
        nvidia.write_text("__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n")
    return result


def _pip_install(wheels: list[Path], site: Path) -> str:
    """'' if pip installed `wheels` into `site` (no index, no dependencies), else pip's last error lines."""
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                          "--disable-pip-version-check", "--upgrade", "--target", str(site), *map(str, wheels)],
                         capture_output=True, text=True)
    return "" if pip.returncode == 0 else " | ".join(pip.stderr.strip().splitlines()[-2:])


def joined_dali(parts_dir: Path, into: Path) -> dict:
    """DALI's wheels from parts_dir/dali.tar.part* when SHA256SUMS lists them all and they match."""
    sums_file = parts_dir / "SHA256SUMS"
    if not sums_file.exists():
        return {"status": f"not installed: no {sums_file}"}
    sums = dict(reversed(line.split()) for line in sums_file.read_text().splitlines() if line.strip())
    wanted = sorted(n for n in sums if ".part" in n)
    missing = [n for n in wanted if not (parts_dir / n).exists()]
    if missing:
        return {"status": f"not installed: {len(wanted) - len(missing)} of {len(wanted)} parts in {parts_dir} "
                          f"(missing {', '.join(missing)})"}
    joined = hashlib.sha256()
    into.mkdir(parents=True, exist_ok=True)
    tar_path = into / "dali.tar"
    with open(tar_path, "wb") as out:
        for name in wanted:
            data = (parts_dir / name).read_bytes()
            if hashlib.sha256(data).hexdigest() != sums[name]:
                return {"status": f"not installed: checksum of {name} does not match SHA256SUMS"}
            joined.update(data)
            out.write(data)
    if joined.hexdigest() != sums.get("dali.tar"):
        return {"status": "not installed: the joined dali.tar does not match SHA256SUMS"}
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    tar_path.unlink()
    return {"status": "installed", "wheels": sorted(into.glob("*.whl"))}


def library_path(site: Path) -> list[str]:
    """Folders of shared libraries that wheels in `site` bring and whose users find them by soname
    (nvImageCodec dlopens libnvjpeg.so.13, which the nvidia-nvjpeg wheel puts in nvidia/cu13/lib):
    for LD_LIBRARY_PATH of the stage processes."""
    return [str(d) for d in sorted(site.glob("nvidia/cu*/lib")) if d.is_dir()]

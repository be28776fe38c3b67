#!/usr/bin/env bash
# Install FFCV 1.0.2 into the active Python environment (or $PYTHON), from source.
#
# FFCV ships only an sdist: its C extension links libturbojpeg and OpenCV found through
# pkg-config, so the Debian dev packages must be present before `pip install`. Idempotent:
# a second run finds everything in place and does nothing (no apt-get update, no pip build).
# Non-interactive; works as root or through sudo. Used by .ci/run.
set -euo pipefail

FFCV_VERSION=1.0.2
PYTHON=${PYTHON:-python}
# g++ builds FFCV's C++ extension; the -dev packages are what its setup.py finds via pkg-config.
APT_PACKAGES=(g++ pkg-config libturbojpeg0-dev libopencv-dev)

if "$PYTHON" - "$FFCV_VERSION" <<'PY' 2>/dev/null; then
import sys
from importlib.metadata import version
import ffcv.loader  # noqa: F401  (imports the compiled extension and numba)
sys.exit(0 if version("ffcv") == sys.argv[1] else 1)
PY
    echo "install_ffcv: ffcv $FFCV_VERSION already installed for $("$PYTHON" -c 'import sys; print(sys.executable)')"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# Debian's own python3 needs its headers for the extension (a pyenv/conda Python ships them).
include_dir=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
if [ ! -f "$include_dir/Python.h" ]; then APT_PACKAGES+=(python3-dev); fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install_ffcv: apt-get install ${missing[*]}"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Both pkg-config names the ffcv setup.py asks for must resolve, or the build fails obscurely.
for pc in opencv4 libturbojpeg; do
    pkg-config --exists "$pc" || { echo "install_ffcv: pkg-config cannot find $pc" >&2; exit 1; }
done

echo "install_ffcv: pip install ffcv==$FFCV_VERSION"
"$PYTHON" -m pip install --quiet "ffcv==$FFCV_VERSION"
"$PYTHON" -c "import ffcv.loader, ffcv.fields; print('install_ffcv: ffcv', __import__('importlib.metadata').metadata.version('ffcv'), 'OK')"

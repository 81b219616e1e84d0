#!/usr/bin/env bash
# Where pip works: fetch the wheels an air-gapped GPU host lacks (see the documentation,
# Deployment > Installing on an air-gapped GPU host). Python 3.12, manylinux x86-64, versions
# pinned to this checkout's .venv where it has them, to constraints-gpu.txt for GPU libraries.
#   .whl/                 the web stack (about 14 MB) and nvImageCodec with its libnvjpeg
#                         (about 29 MB), for --device-decoder nvimgcodec
#   .whl-ort/part-NN      onnxruntime-gpu (255 MB) in 48 MB parts, for transfers that limit a
#                         file's size; on the GPU host put every part, NAME, PARTS and SHA256SUMS
#                         in /tmp/ort/, and gpu_lease.sh joins them (checking the sha256).
#   bash bench/gpu_wheels.sh [--with-ort] [--dry-run]
# --dry-run prints the pip commands it would run (one a line) and downloads nothing.
set -euo pipefail
PYVER=${PYVER:-3.12}
PIP=${PIP:-.venv/bin/python -m pip}
with_ort=no dry_run=no
for arg in "$@"; do
    case $arg in
    --with-ort) with_ort=yes ;;
    --dry-run) dry_run=yes ;;
    *) echo "gpu_wheels.sh: unknown argument $arg; use --with-ort and/or --dry-run" >&2 && exit 2 ;;
    esac
done
platform=(--no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
web=(fastapi starlette uvicorn httptools python-multipart orjson pydantic pydantic-core
    pydantic-settings python-dotenv annotated-types typing-inspection annotated-doc
    opentelemetry-api pillow timm)
# nvImageCodec's nvjpeg extension loads libnvjpeg.so.13 from the nvidia-nvjpeg wheel.
gpu=(nvidia-nvimgcodec-cu13 nvidia-nvjpeg)
frozen=$($PIP freeze 2>/dev/null || true)  # read once: pip takes a second per call
pinned() {  # name==version from the local venv, else the bare name (newest)
    local found
    found=$(grep -i -E "^${1//-/[-_]}==" <<<"$frozen" | head -1 || true)
    echo "${found:-$1}"
}
gpu_pin() {  # name==version from constraints-gpu.txt
    grep -E "^$1==" constraints-gpu.txt || { echo "gpu_wheels.sh: $1 is not pinned in constraints-gpu.txt" >&2 && exit 1; }
}
download() {  # into folder $1 the requirement $2
    if [[ $dry_run == yes ]]; then
        echo "$PIP download -q ${platform[*]} -d $1 $2"
    else
        $PIP download -q "${platform[@]}" -d "$1" "$2"
    fi
}
[[ $dry_run == yes ]] || mkdir -p .whl
for name in "${web[@]}"; do
    download .whl "$(pinned "$name")"
done
for name in "${gpu[@]}"; do
    requirement=$(gpu_pin "$name")  # an assignment, so set -e stops on a missing pin
    download .whl "$requirement"
done
if [[ $with_ort == yes ]]; then
    ort=$(gpu_pin onnxruntime-gpu)
    if [[ $dry_run == yes ]]; then
        download .whl-ort "$ort"
        echo "# then split it into 48 MB parts in .whl-ort/ with NAME, PARTS and SHA256SUMS"
        exit 0
    fi
    rm -rf .whl-ort && mkdir -p .whl-ort .whl-ort-carry
    download .whl-ort "$ort"
    wheel=$(cd .whl-ort && ls onnxruntime_gpu-*.whl)
    (cd .whl-ort && sha256sum "$wheel" >SHA256SUMS && split -b 48m -d "$wheel" part- && rm "$wheel")
    echo "$wheel" >.whl-ort/NAME
    ls .whl-ort/part-* | wc -l >.whl-ort/PARTS
fi
[[ $dry_run == yes ]] || du -sh .whl .whl-ort 2>/dev/null

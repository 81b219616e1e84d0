#!/usr/bin/env bash
# Where pip works: fetch the wheels an air-gapped GPU host lacks (see the documentation,
# Deployment > Installing on an air-gapped GPU host). Python 3.12, manylinux x86-64, versions
# pinned to this checkout's .venv where it has them.
#   .whl/                 the web stack (about 14 MB)
#   .whl-ort/part-NN      onnxruntime-gpu (255 MB) in 48 MB parts, for transfers that limit a
#                         file's size; on the GPU host put every part, NAME, PARTS and SHA256SUMS
#                         in /tmp/ort/, and gpu_lease.sh joins them (checking the sha256).
#   bash bench/gpu_wheels.sh [--with-ort]
set -euo pipefail
PYVER=${PYVER:-3.12}
PIP=${PIP:-.venv/bin/python -m pip}
platform=(--no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
web=(fastapi starlette uvicorn httptools python-multipart orjson pydantic pydantic-core
    pydantic-settings python-dotenv annotated-types typing-inspection annotated-doc
    opentelemetry-api pillow timm)
frozen=$($PIP freeze 2>/dev/null || true)  # read once: pip takes a second per call
pinned() {  # name==version from the local venv, else the bare name (newest)
    local found
    found=$(grep -i -E "^${1//-/[-_]}==" <<<"$frozen" | head -1 || true)
    echo "${found:-$1}"
}
mkdir -p .whl
for name in "${web[@]}"; do
    $PIP download -q "${platform[@]}" -d .whl "$(pinned "$name")"
done
if [[ ${1:-} == --with-ort ]]; then
    rm -rf .whl-ort && mkdir -p .whl-ort .whl-ort-carry
    ort=$(grep -E '^onnxruntime-gpu==' constraints-gpu.txt)
    $PIP download -q "${platform[@]}" -d .whl-ort "$ort"
    wheel=$(cd .whl-ort && ls onnxruntime_gpu-*.whl)
    (cd .whl-ort && sha256sum "$wheel" >SHA256SUMS && split -b 48m -d "$wheel" part- && rm "$wheel")
    echo "$wheel" >.whl-ort/NAME
    ls .whl-ort/part-* | wc -l >.whl-ort/PARTS
fi
du -sh .whl .whl-ort 2>/dev/null

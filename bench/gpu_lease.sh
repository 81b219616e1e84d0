#!/usr/bin/env bash
# `make gpu-check` on an air-gapped GPU host that has PyTorch, timm and ONNX Runtime but none of
# the web stack, and no network. The missing wheels travel in .whl/ (see the documentation,
# Deployment > Installing on an air-gapped GPU host); the log and env.txt land in $OUT (default
# bench/results/gpu-lease), the run's JSON in docs/bench like make gpu-check's.
#   bash bench/gpu_lease.sh [gpu-check arguments...]
set -uo pipefail
OUT=${OUT:-bench/results/gpu-lease}
mkdir -p "$OUT"
{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    nproc
    python3 -V
} >"$OUT/env.txt" 2>&1
# onnxruntime-gpu, carried in parts by earlier calls (bench/gpu_wheels.sh --with-ort)
if [[ -f /tmp/ort/NAME && -f /tmp/ort/PARTS ]]; then
    have=$(compgen -G "/tmp/ort/part-*" | wc -l)
    if [[ $have -eq $(cat /tmp/ort/PARTS) ]]; then
        wheel=/tmp/ort/$(cat /tmp/ort/NAME)
        cat /tmp/ort/part-* >"$wheel"
        (cd /tmp/ort && sha256sum -c SHA256SUMS) && mkdir -p .whl && cp "$wheel" .whl/
    else
        echo "onnxruntime-gpu: $have of $(cat /tmp/ort/PARTS) parts in /tmp/ort; not installed" >&2
    fi
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
python3 - >>"$OUT/env.txt" 2>&1 <<'PY'
import importlib

for name in ("torch", "torchvision", "timm", "onnx", "onnxruntime", "PIL", "numpy", "fastapi",
             "nvidia.nvimgcodec"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # print what is missing and go on
        print(name, "missing:", exc)
import onnxruntime, torch

print("ort providers", onnxruntime.get_available_providers())
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.backends.cudnn.version())
PY
cat "$OUT/env.txt"
export PYTHONUNBUFFERED=1
python3 -m bench.gpu_check --out /tmp/gpu-check "$@" 2>&1 | tee "$OUT/gpu-check.log"
exit "${PIPESTATUS[0]}"

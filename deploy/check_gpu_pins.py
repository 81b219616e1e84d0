"""Check a pip --dry-run report of '.[gpu]' against constraints-gpu.txt: one CUDA major."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

CUDA_MAJOR = "13"


def main(report_path: str, constraints_path: str) -> int:
    report = json.loads(Path(report_path).read_text())
    resolved = {
        re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower(): item["metadata"]["version"]
        for item in report["install"]
    }
    pins = dict(
        line.split("#")[0].strip().split("==")
        for line in Path(constraints_path).read_text().splitlines()
        if "==" in line.split("#")[0]
    )
    problems = [
        f"{name} resolved to {resolved[name]}, pinned {version}"
        for name, version in pins.items()
        if name in resolved and resolved[name].split("+")[0] != version
    ]
    other_cuda = sorted(n for n in resolved if re.search(r"-cu(da)?1[0-2]\d?\b", n))
    problems += [f"{name} is built for another CUDA major" for name in other_cuda]
    runtime = resolved.get("nvidia-cuda-runtime", "")
    if not runtime.startswith(f"{CUDA_MAJOR}."):
        problems.append(f"nvidia-cuda-runtime {runtime or 'missing'}: want CUDA {CUDA_MAJOR}")
    for problem in problems:
        print(f"check_gpu_pins: {problem}", file=sys.stderr)
    cuda = sorted(f"{n}=={v}" for n, v in resolved.items() if n.startswith(("nvidia-", "cuda-")))
    print(
        f"GPU pins resolve to one CUDA major ({CUDA_MAJOR}): torch=={resolved.get('torch')}, "
        f"onnxruntime-gpu=={resolved.get('onnxruntime-gpu')}, {len(cuda)} CUDA packages"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

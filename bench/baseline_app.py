"""The obvious app hiera-serve must never lose to: FastAPI + ONNX Runtime, one image per call.

No batching, no queue, no metrics: each request decodes, preprocesses exactly as hiera-serve
does (the same `service.imaging` functions, exact decode) and runs its own `session.run` on
Starlette's thread pool. `hiera-bench` starts it beside hiera-serve on the same model.

    python -m bench.baseline_app --model-repository model_repository/hiera_tiny_224 --port 8001
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from model.artifacts import ModelRepository
from service.imaging import Preprocessing, decode_image, preprocess


def create_baseline_app(model_dir: Path, *, precision: str = "fp32") -> FastAPI:
    """Load the repository's ONNX artifact and serve `/v1/classify` without batching."""
    repo = ModelRepository.load(model_dir)
    m = repo.manifest.preprocessing
    pp = Preprocessing(m.input_size, m.mean, m.std, m.interpolation, m.crop_pct, m.crop_mode)
    artifact = repo.artifact_path("onnx_int8" if precision == "int8" else "onnx")
    session = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
    app = FastAPI()

    def classify_bytes(body: bytes, top_k: int) -> dict[str, Any]:
        pixels = preprocess(decode_image(body, max_pixels=50_000_000).image, pp)
        logits = session.run(["logits"], {"images": pixels[None]})[0][0]
        scores = np.exp(logits - logits.max())
        scores /= scores.sum()
        top = np.argsort(-scores, kind="stable")[:top_k]
        return {"labels": [{"index": int(i), "score": float(scores[i])} for i in top]}

    @app.post("/v1/classify")
    async def classify(request: Request, top_k: int = 5) -> dict[str, Any]:
        return await run_in_threadpool(classify_bytes, await request.body(), top_k)

    @app.get("/health/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    return app


def main() -> None:
    """Serve the baseline app."""
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_app", description=__doc__)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    app = create_baseline_app(args.model_repository, precision=args.precision)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

"""Measure how closely an exported artifact reproduces eager PyTorch."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from model.artifacts import ParityFigures

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

# fp32 artifacts reproduce eager to ~1e-5 on random-init and trained Hiera alike; fp16 rounds
# each activation to 11 bits, so its bound is looser but still far below anything that would
# change a top-5 answer.
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}


def eager_runner(module: torch.nn.Module, *, autocast: torch.dtype | None = None) -> Runner:
    """Run the module on numpy input on the CPU, under CPU autocast to `autocast` if given."""

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cast = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
        with torch.inference_mode(), cast:
            logits, embedding = module(torch.from_numpy(batch))
        return logits.float().numpy(), embedding.float().numpy()

    return run


def torchscript_runner(path: Path, *, autocast: torch.dtype | None = None) -> Runner:
    """Load a TorchScript file and run it on numpy input (see eager_runner)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "jit is deprecated": still the format
        scripted = torch.jit.load(str(path), map_location="cpu").eval()
    return eager_runner(scripted, autocast=autocast)


def onnx_runner(path: Path, *, threads: int = 0) -> Runner:
    """Open an ONNX Runtime CPU session and run it on numpy input, casting to its input dtype."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_meta = session.get_inputs()[0]
    dtype = np.float16 if input_meta.type == "tensor(float16)" else np.float32

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, embedding = session.run(None, {input_meta.name: batch.astype(dtype)})
        return np.asarray(logits, np.float32), np.asarray(embedding, np.float32)

    return run


def measure(
    reference: Runner,
    candidate: Runner,
    *,
    input_size: tuple[int, int],
    batch_sizes: Sequence[int] = (1, 5),
    tolerance: float,
    seed: int = 0,
) -> ParityFigures:
    """Compare logits and embeddings of `candidate` against `reference` on seeded inputs."""
    rng = np.random.default_rng(seed)
    emb_err = logit_err = 0.0
    min_cos = 1.0
    for batch_size in batch_sizes:
        # Standard-normal pixels look like normalised images to the model.
        batch = rng.standard_normal((batch_size, 3, *input_size), dtype=np.float32)
        ref_logits, ref_emb = reference(batch)
        logits, emb = candidate(batch)
        if emb.shape != ref_emb.shape or logits.shape != ref_logits.shape:
            raise ValueError(
                f"artifact output shapes {logits.shape}, {emb.shape} differ from eager "
                f"{ref_logits.shape}, {ref_emb.shape} at batch {batch_size}"
            )
        emb_err = max(emb_err, float(np.abs(emb - ref_emb).max()))
        logit_err = max(logit_err, float(np.abs(logits - ref_logits).max()) if logits.size else 0.0)
        min_cos = min(min_cos, float(cosine(emb, ref_emb).min()))
    return ParityFigures(
        batch_sizes=list(batch_sizes),
        embedding_max_abs=emb_err,
        logits_max_abs=logit_err,
        embedding_min_cosine=min_cos,
        tolerance=tolerance,
        passed=max(emb_err, logit_err) <= tolerance,
    )


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the row-wise cosine similarity of two [N, D] arrays, in float64."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    denom = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return np.asarray((a64 * b64).sum(axis=1) / np.maximum(denom, 1e-12))

"""Triton's model configuration and statistics extensions, for REST here and for gRPC.

The configuration is model.triton's `model_config`, the one source config.pbtxt is written
from, filled in with what this server serves. The statistics are read from the metrics
registry /metrics is rendered from (all workers', in multiprocess mode), so the two agree.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from fastapi import APIRouter

from model.triton import model_config
from service.card import ModelCard
from service.inference import InferenceService
from service.metrics import Metrics
from service.responses import JSONResponse
from service.routes import kserve_codec as codec
from service.routes import kserve_v2

# The KServe router's route class and documented errors: the same {"error": "..."} shape.
router = APIRouter(
    prefix="/v2",
    tags=["kserve v2"],
    route_class=kserve_v2.router.route_class,
    responses=kserve_v2.router.responses,
)


def served_config(service: InferenceService, card: ModelCard) -> dict[str, Any]:
    """Return Triton's ModelConfig (JSON mapping) for the model as this server serves it."""
    return model_config(
        name=card.name,
        platform=kserve_v2.PLATFORMS[service.backend_name],
        tensor_names=(codec.PIXELS_INPUT, *codec.OUTPUTS),
        input_size=card.preprocessing.input_size,
        num_classes=card.num_classes,
        embed_dim=card.embed_dim,
        max_batch_size=service.batch_cap,
        max_queue_delay_us=round(service.settings.max_delay_ms * 1000),
    )


def model_statistics(metrics: Metrics, name: str, version: str) -> dict[str, Any]:
    """Return Triton's ModelStatistics (JSON mapping) from the service's metrics.

    Counts are per request (success, fail) and per image (queue, compute_*), summed over
    every protocol; as in Triton, each image of a batch counts the whole batch's compute.
    compute_input is decode + preprocess, compute_infer the model, compute_output the
    postprocess (softmax, top-k, encoding).
    """
    totals: dict[str, float] = defaultdict(float)
    for family in metrics.registry.collect():
        for sample in family.samples:
            key = _statistic(sample.name, sample.labels)
            if key is not None:
                totals[key] += sample.value

    def duration(stat: str) -> dict[str, int]:
        return {"count": round(totals[f"{stat}.count"]), "ns": round(totals[f"{stat}.s"] * 1e9)}

    return {
        "name": name,
        "version": version,
        "inference_count": round(totals["images"]),
        "execution_count": round(totals["batches"]),
        "inference_stats": {stat: duration(stat) for stat in _INFERENCE_STATS},
    }


_INFERENCE_STATS = (
    "success", "fail", "queue", "compute_input", "compute_infer", "compute_output"
)  # fmt: skip
_STAGES = {
    "queue": "queue",
    "decode": "compute_input",
    "inference": "compute_infer",
    "postprocess": "compute_output",
}


def _statistic(sample: str, labels: dict[str, str]) -> str | None:
    """Name the statistic a metric sample adds to, or None if it adds to none."""
    if sample == "hiera_batch_size_sum":
        return "images"
    if sample == "hiera_batch_size_count":
        return "batches"
    if sample in ("hiera_request_outcomes_total", "hiera_request_outcome_seconds_total"):
        stat = "success" if labels.get("outcome") == "ok" else "fail"
        return f"{stat}.{'count' if sample.endswith('outcomes_total') else 's'}"
    if sample not in ("hiera_stage_duration_seconds_sum", "hiera_stage_duration_seconds_count"):
        return None
    part = "s" if sample.endswith("_sum") else "count"
    stage = labels.get("stage", "")
    if stage == "preprocess":  # part of compute_input, whose count decode gives
        return "compute_input.s" if part == "s" else None
    stage_stat = _STAGES.get(stage)
    return None if stage_stat is None else f"{stage_stat}.{part}"


@router.get("/models/{name}/config", summary="Triton model configuration (ModelConfig JSON)")
@router.get("/models/{name}/versions/{version}/config", summary="Triton model configuration")
async def model_configuration(
    name: str, service: kserve_v2.ServiceDep, version: str = kserve_v2.MODEL_VERSION
) -> JSONResponse:
    card = kserve_v2._card(service, name, version)
    return JSONResponse(served_config(service, card))


@router.get("/models/stats", summary="Triton statistics of every model served")
@router.get("/models/{name}/stats", summary="Triton model statistics (ModelStatistics JSON)")
@router.get("/models/{name}/versions/{version}/stats", summary="Triton model statistics")
async def model_stats(
    service: kserve_v2.ServiceDep, name: str = "", version: str = kserve_v2.MODEL_VERSION
) -> JSONResponse:
    # Unnamed: all models, which is the one (its card, once loaded).
    card = kserve_v2._card(service, name, version) if name else service.card
    stats = [] if card is None else [model_statistics(service.metrics, card.name, version)]
    return JSONResponse({"model_stats": stats})

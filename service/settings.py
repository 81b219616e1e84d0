"""All service configuration in one validated object, filled by HIERA_* env vars and CLI flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BackendName = Literal["onnx", "torchscript", "eager"]
DeviceName = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "fp16", "bf16", "int8"]


# Room for the error of a JPEG the engine refuses, written back into its slot.
MIN_JPEG_SLOT_BYTES = 4096


class Settings(BaseSettings):
    """hiera-serve configuration; every field is also `HIERA_<FIELD>` and `--<field>`."""

    model_config = SettingsConfigDict(
        env_prefix="HIERA_",
        extra="forbid",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="hiera-serve",
        validate_default=True,
    )

    # What to serve.
    model_repository: Path | None = Field(
        None,
        description="model folder written by hiera-export (holding manifest.json), or a "
        "repository root holding exactly one such folder; checksums are verified at load",
    )
    variant: str = Field(
        "hiera_tiny_224", description="Hiera variant to export on the fly when no repository"
    )
    weights: str | None = Field(
        None,
        description="'pretrained', a checkpoint path or 'random'; used with --variant when "
        "--model-repository is not given (exports into --export-dir first)",
    )
    seed: int = Field(0, description="seed for --weights random")
    export_dir: Path = Field(
        Path("model_repository"), description="where on-the-fly exports are written and reused"
    )

    # How to run it.
    backend: BackendName = Field("onnx", description="runtime: onnx, torchscript or eager")
    device: DeviceName = Field(
        "auto", description="auto uses every visible CUDA device when present, else the CPU"
    )
    precision: Precision = Field(
        "fp32",
        description="fp32; fp16 (ONNX: the fp16 artifact; torch: autocast); bf16 (torch "
        "autocast, CPUs with AMX/AVX-512 BF16 or GPUs); int8 (ONNX on CPU: the dynamically "
        "quantized artifact, exported only if it agrees with fp32 on real photos)",
    )
    onnx_providers: list[str] | None = Field(
        None,
        description="ONNX Runtime execution providers in priority order (default: TensorRT, "
        "CUDA, CPU, whichever are available and allowed by --device)",
    )
    intra_op_threads: int = Field(0, ge=0, description="threads per instance; 0 = runtime default")
    intra_op_spinning: bool = Field(
        True,
        description="let ONNX Runtime's intra-op threads busy-wait between operators (its "
        "default): 10-20% lower latency at light load on a CPU; --no-intra-op-spinning when "
        "the cores are oversubscribed (more instances x threads than cores)",
    )
    instances_per_device: int = Field(1, ge=1, le=64, description="model instances per device")
    adaptive_layout: bool = Field(
        True,
        description="on a CPU with the ONNX backend and the default layout (one instance, "
        "runtime-default threads) on 2 or more cores: add one single-threaded instance per "
        "core (at most 4, splitting the cores) for when requests queue, and keep the instance "
        "that uses every core for a request that comes alone (never both at once); each is a "
        "session of its own, so it stays off when they would take over half the free memory; "
        "--no-adaptive-layout keeps the one instance",
    )
    decode_device: Literal["auto", "cpu", "cuda"] = Field(
        "cpu",
        description="where JPEGs are decoded and cropped: cpu (exact, the default); cuda, or "
        "auto = on the GPU (nvJPEG) when the model runs on one (by the engine process with "
        "--engine process), faster but it agreed with the "
        "CPU path only at embedding cosine 0.989 on an H200; other formats always decode on "
        "the CPU",
    )
    device_decoder: Literal["auto", "nvimgcodec", "torchvision"] = Field(
        "auto",
        description="which library decodes JPEGs on the GPU when --decode-device puts them "
        "there: nvimgcodec (nvImageCodec, hardware JPEG decoder where the GPU has one, chroma "
        "interpolated like Pillow's libjpeg-turbo), torchvision (nvJPEG with nearest-neighbour "
        "chroma), or auto = nvimgcodec when installed (the gpu extra), else torchvision",
    )
    jpeg_slot_bytes: int = Field(
        4 * 2**20,
        ge=0,
        description="with --engine process and device decode: the largest JPEG a front end "
        "passes to its engine undecoded (at most --max-body-bytes); a larger one is decoded "
        "on the front end's CPU. Each front end holds one such slot per image the engine "
        "admits, in shared memory touched only as uploads fill it; 0 = front ends decode all; "
        "else at least 4096 (a refused JPEG's error comes back in its slot)",
    )
    tf32: bool = Field(
        True,
        description="let fp32 use TF32 tensor cores on GPUs (ONNX CUDA EP and torch); "
        "--no-tf32 for strict fp32",
    )
    gpu_mem_limit_bytes: int = Field(
        0, ge=0, description="cap on each ONNX Runtime CUDA instance's memory arena; 0 = none"
    )
    trt_cache_dir: Path = Field(
        Path("trt_cache"),
        description="TensorRT engine and timing caches; keep it on a volume so restarts skip "
        "the engine build",
    )
    cuda_graphs: bool = Field(
        True,
        description="torchscript and eager backends on CUDA devices: capture one CUDA graph "
        "per batch-size bucket at start-up and replay it (no effect on the CPU or on onnx); "
        "--no-cuda-graphs to run every batch eagerly",
    )
    onnx_cuda_graphs: bool = Field(
        False,
        description="onnx backend on CUDA devices: let ONNX Runtime's GPU provider capture "
        "one CUDA graph per batch-size bucket and replay it (opt-in)",
    )

    # Batching and admission.
    max_batch_size: int = Field(8, ge=1, le=1024, description="largest batch sent to a model")
    max_delay_ms: float = Field(
        5.0, ge=0, le=10_000, description="wait at most this long after a batch's first request"
    )
    max_queue_size: int = Field(256, ge=1, description="images waiting beyond this get 429")
    request_timeout_s: float = Field(
        30.0, gt=0, description="per-request deadline; requests past it get 504"
    )
    batch_cap_from_warmup: bool = Field(
        True,
        description="time batch sizes 1, 2, 4, ... after warm-up and cap batches at the "
        "smallest within 5% of the best time per image (where batching buys no throughput, "
        "as on small CPUs, batches stay small); --no-batch-cap-from-warmup uses "
        "--max-batch-size as is",
    )
    batch_wait_when_idle: bool = Field(
        False,
        description="wait up to --max-delay-ms for company even when no batch is running; by "
        "default a request that finds every instance idle is dispatched at once",
    )
    decode_threads: int = Field(
        default_factory=lambda: min(4, available_cores()),
        ge=1,
        le=256,
        description="threads decoding images; default: the cores, at most 4 (more threads "
        "than cores only take turns at the GIL, and the event loop waits in that queue too)",
    )
    thread_niceness: int = Field(
        5,
        ge=0,
        le=19,
        description="nice value added to the decode and inference threads (Linux), so the "
        "event loop, which accepts, refuses and answers requests, gets a core first when the "
        "model keeps every core busy; 0 = same priority",
    )
    jpeg_draft: bool = Field(
        False,
        description="decode large JPEGs at reduced scale (libjpeg DCT scaling): faster, but "
        "the model input differs from timm's transform on a full decode; off = exact",
    )
    max_consecutive_failures: int = Field(
        3,
        ge=1,
        description="batches failing in a row before the runtime counts as broken (readiness "
        "and liveness then fail); one failed batch fails only its own requests",
    )
    batch_timeout_s: float = Field(
        120.0,
        ge=0,
        description="watchdog: a batch running longer breaks the runtime (readiness and "
        "liveness fail); 0 = off",
    )

    # Input limits.
    max_body_bytes: int = Field(32 * 2**20, ge=1024, description="largest request body")
    max_image_pixels: int = Field(
        50_000_000, ge=1, description="largest decoded image, width x height"
    )
    max_images_per_request: int = Field(64, ge=1, description="images in one batch request")
    max_embedding_inputs: int = Field(
        2048,
        ge=1,
        le=2048,
        description="inputs in one /v1/embeddings request (OpenAI's own limit is 2048); a "
        "large request is fed to the model in slices as capacity frees",
    )
    max_top_k: int = Field(100, ge=1, description="largest top_k a client may ask for")

    # Process.
    host: str = Field("127.0.0.1", description="bind address (0.0.0.0 in containers)")
    port: int = Field(8000, ge=0, le=65535, description="bind port")
    grpc_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="also serve the Open Inference Protocol over gRPC (KServe v2 / Triton's "
        "GRPCInferenceService) on this port, same host; off unless set",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="server processes sharing the port, each with its own batcher and model "
        "instances; GPUs are split round-robin over them",
    )
    engine: Literal["auto", "inline", "process"] = Field(
        "auto",
        description="where the model runs: process = one engine process per GPU (one for the "
        "CPU instances) fed by every worker over shared memory, so the workers hold no model "
        "and the GPU gets one batcher; inline = a model copy inside every worker; auto = "
        "process on a GPU host, inline on a CPU-only host",
    )
    engine_socket: Path | None = Field(
        None,
        description="internal: the Unix socket of the engine process a worker reaches, set by "
        "the supervisor for its workers (with it, a worker loads no model of its own)",
    )
    log_format: Literal["json", "text"] = Field("json", description="json (one object per line)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="level")
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="on shutdown, finish queued and running requests for at most this long; "
        "those still waiting then get 503 shutting_down",
    )

    # Access and exposure.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="comma-separated API keys; when any is set (here or in --api-keys-file), "
        "every route but the health probes needs 'Authorization: Bearer <key>' or "
        "'X-API-Key: <key>'",
    )
    api_keys_file: Path | None = Field(
        None, description="file with one API key per line (# comments), e.g. a mounted secret"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated origins allowed by CORS (e.g. https://app.example.com); "
        "empty = CORS off",
    )
    docs: bool = Field(
        True, description="serve /docs, /redoc and /openapi.json; --no-docs hides them"
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="serve /metrics on this port (same host) instead of the API port",
    )

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Self:
        if self.model_repository is None and self.weights is None:
            raise ValueError(
                "nothing to serve: set --model-repository (a folder from hiera-export) or "
                "--weights (pretrained, a checkpoint path, or random) with --variant"
            )
        if self.precision == "bf16" and self.backend == "onnx":
            raise ValueError("precision bf16 needs --backend torchscript or eager")
        if self.precision == "int8" and (self.backend != "onnx" or self.device == "cuda"):
            raise ValueError(
                "precision int8 is the quantized ONNX artifact for the CPU: use --backend onnx "
                "with --device cpu (or auto on a host without a GPU)"
            )
        if 0 < self.jpeg_slot_bytes < MIN_JPEG_SLOT_BYTES:
            raise ValueError(
                f"--jpeg-slot-bytes must be 0 (front ends decode every JPEG) or at least "
                f"{MIN_JPEG_SLOT_BYTES}, got {self.jpeg_slot_bytes}"
            )
        if self.decode_device == "cuda" and self.device == "cpu":
            raise ValueError(
                "--decode-device cuda decodes where the model runs, but --device is cpu; "
                "use --device cuda (or auto) or --decode-device cpu"
            )
        return self


def available_cores() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1

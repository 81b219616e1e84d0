"""ONNX Runtime backend: TensorRT, CUDA or CPU execution providers, verified after start."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.postprocess import BatchOutputs
from service.runtime import providers as ep
from service.runtime.base import BackendError

if TYPE_CHECKING:
    import torch

    from service.runtime.onnx_graphs import OrtGraphs

# Kept for callers that import it from here.
choose_providers = ep.choose_providers


class OnnxBackend:
    """One ONNX Runtime session pinned to one device."""

    name = "onnx"

    def __init__(
        self,
        path: Path,
        *,
        device: str,
        precision: str,
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
        spinning: bool = True,
        gpu: ep.GpuOptions | None = None,
    ) -> None:
        import onnxruntime as ort

        self.device = device
        self.precision = precision
        chosen = ep.choose_providers(device, ort.get_available_providers(), providers)
        self._device_id = int(device.split(":")[1]) if device.startswith("cuda") else 0
        gpu = gpu or ep.GpuOptions()
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        # Spinning threads keep a core busy between operators: faster on a dedicated CPU
        # (about 64 vs 71-91 ms per Hiera-T image on 2 cores), wasteful when oversubscribed.
        options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spinning)))
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.stream: torch.cuda.Stream | None = None
        per_provider = [ep.provider_options(p, self._device_id, gpu) for p in chosen]
        # CUDA graphs (opt-in): the first GPU provider captures them; `prepare` binds the
        # static buffers. The device then also ranks and normalises (device_post).
        self._graphs: OrtGraphs | None = None
        self._graph_top_k = gpu.device_top_k
        graphed = ep.graph_provider(chosen) if gpu.cuda_graph else None
        self._capture = graphed is not None
        # Runs outside the buckets (none in service) must not capture or replay graph id 0.
        self._ungraphed: Any = None
        if graphed is not None:
            per_provider[chosen.index(graphed)] |= ep.graph_options(graphed)
            self._ungraphed = ort.RunOptions()
            self._ungraphed.add_run_config_entry("gpu_graph_id", "-1")
        self.cuda_graphs = False  # True once every bucket is captured
        self.device_top_k: int | None = None
        if ep.GPU_PROVIDERS & set(chosen):
            _preload_cuda_libraries(ort)
            if ep.TENSORRT in chosen and gpu.trt_cache_dir is not None:
                gpu.trt_cache_dir.mkdir(parents=True, exist_ok=True)
            self.stream = _instance_stream(device)
            for provider, opts in zip(chosen, per_provider, strict=True):
                if provider in ep.GPU_PROVIDERS:
                    # ORT computes on this instance's own stream, the one its inputs are
                    # prepared on: ordering without a device-wide synchronisation.
                    opts |= {"has_user_compute_stream": "1", "user_compute_stream": str(
                        self.stream.cuda_stream)}  # fmt: skip
        printed = io.StringIO()
        try:
            # ORT prints why a provider failed before silently retrying without it.
            with contextlib.redirect_stdout(printed):
                self._session = ort.InferenceSession(
                    str(path), options, providers=chosen, provider_options=per_provider
                )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise BackendError(f"ONNX Runtime could not load {path}: {exc}") from exc
        ep.verify(
            chosen,
            self._session.get_providers(),
            self._session.get_provider_options(),
            self._device_id,
            printed.getvalue(),
        )
        self.providers = self._session.get_providers()
        self.provider = self.providers[0]
        meta = self._session.get_inputs()[0]
        self._input_name = meta.name
        self._output_names = [o.name for o in self._session.get_outputs()]
        self.input_dtype = "float16" if meta.type == "tensor(float16)" else "float32"

    def prepare(self, max_batch_size: int, input_shape: tuple[int, ...]) -> None:
        """Capture one CUDA graph per batch bucket, if asked to; a failure fails the start."""
        if not self._capture:
            return
        import torch

        from service.runtime.graphs import StaticSpec
        from service.runtime.onnx_graphs import OrtGraphs

        dtype = torch.float16 if self.input_dtype == "float16" else torch.float32
        spec = StaticSpec(max_batch_size, input_shape, dtype, torch.device(self.device))
        try:
            runner = OrtGraphs(self._session, spec)
            with torch.cuda.stream(self.stream):
                runner.prepare()
            torch.cuda.synchronize(spec.device)
        except Exception as exc:
            # A session built to capture cannot be trusted to run un-graphed: refuse to serve.
            raise BackendError(
                f"ONNX Runtime could not capture CUDA graphs on {self.device}: {exc}; serve "
                "without --onnx-cuda-graphs"
            ) from exc
        self._graphs = runner
        self.cuda_graphs = True
        self.device_top_k = self._graph_top_k

    def infer_outputs(self, batch: Any, *, logits: bool) -> BatchOutputs:
        """Replay a batch's graph and postprocess its device outputs there (device_post)."""
        import torch

        from service.runtime.device_post import postprocess

        if self._graphs is None or self.device_top_k is None:
            raise BackendError("this instance postprocesses on the host; call infer()")
        with torch.cuda.stream(self.stream):
            out_logits, embedding = self._graphs(batch)
            return postprocess(out_logits, embedding, top_k=self.device_top_k, want_logits=logits)

    def infer(self, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        """Run a numpy batch, or a torch tensor already on this instance's GPU (no host copy)."""
        if self._graphs is not None and not isinstance(batch, np.ndarray):
            return self._replayed(batch)
        if isinstance(batch, np.ndarray):
            feed = {self._input_name: batch.astype(self.input_dtype, copy=False)}
            logits, embedding = self._session.run(None, feed, self._ungraphed)
        else:
            logits, embedding = self._run_bound(batch)
        return np.asarray(logits, np.float32), np.asarray(embedding, np.float32)

    def _replayed(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        import torch

        assert self._graphs is not None
        with torch.cuda.stream(self.stream):
            logits, embedding = self._graphs(batch)
            return logits.float().cpu().numpy(), embedding.float().cpu().numpy()

    def _run_bound(self, batch: torch.Tensor) -> list[np.ndarray]:
        """Hand ORT the device tensor's memory through I/O binding; outputs come back small."""
        batch = batch.contiguous()
        if str(batch.dtype) != f"torch.{self.input_dtype}":
            raise BackendError(f"ONNX session expects {self.input_dtype}, got {batch.dtype}")
        binding = self._session.io_binding()
        binding.bind_input(
            self._input_name,
            device_type=batch.device.type,
            device_id=batch.device.index or 0,
            element_type=np.dtype(self.input_dtype).type,
            shape=tuple(batch.shape),
            buffer_ptr=batch.data_ptr(),
        )
        for name in self._output_names:
            binding.bind_output(name)  # host memory: [B, C] and [B, D] are a few KB per row
        if self.stream is not None:
            # Inputs were written on this stream; ORT runs on it too (user_compute_stream).
            binding.synchronize_inputs()
        if self._ungraphed is not None:
            self._session.run_with_iobinding(binding, self._ungraphed)
        else:
            self._session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())

    def close(self) -> None:
        self._graphs = None
        del self._session


def _instance_stream(device: str) -> torch.cuda.Stream:
    import torch

    return torch.cuda.Stream(device=torch.device(device))


def _preload_cuda_libraries(ort: Any) -> None:
    """Let ORT find the CUDA/cuDNN libraries that pip wheels (e.g. torch's) put on disk."""
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime-gpu >= 1.21
    if preload is not None:
        with contextlib.suppress(Exception):  # verify() reports what is still missing
            preload()

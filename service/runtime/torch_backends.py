"""PyTorch backends: a traced TorchScript file, or the eager module built from weights."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.postprocess import BatchOutputs
from service.runtime.base import BackendError
from service.runtime.device_post import postprocess
from service.runtime.graphs import BucketRunner, Forward, StaticSpec

log = logging.getLogger(__name__)

# Builds the runner that replays a forward on static buffers: CudaGraphs on a GPU.
GraphFactory = Callable[[Forward, StaticSpec], BucketRunner]

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TorchBackend:
    """Run a module that maps [B, 3, H, W] to (logits, embedding) on one device.

    With `graphs`, `prepare` captures the forward once per batch bucket and `infer` replays it
    (service.runtime.graphs). With `device_top_k`, `infer_outputs` ranks and normalises the
    batch on the device (service.runtime.device_post), at most that many classes per row.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        name: str,
        device: str,
        precision: str,
        graphs: GraphFactory | None = None,
        device_top_k: int | None = None,
    ):
        if precision == "fp16" and device == "cpu":
            raise BackendError("fp16 autocast is a GPU feature; use bf16 or fp32 on the CPU")
        self.name = name
        self.device = device
        self.precision = precision
        self._torch_device = torch.device(device)
        self._module = module.to(self._torch_device).eval()
        if precision != "fp32":
            precast(self._module, _DTYPES[precision])
        self.input_dtype = "float32"  # autocast casts inside the model
        self.provider = f"torch-{self._torch_device.type}"
        # One stream per instance, so instances on one GPU overlap instead of queueing on the
        # default stream; the pool's feeder prepares this instance's inputs on it too.
        self.stream = torch.cuda.Stream(self._torch_device) if device != "cpu" else None
        self._graph_factory = graphs
        self._graphs: BucketRunner | None = None
        self.cuda_graphs = False  # True once every bucket is captured
        self.device_top_k = device_top_k

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        stream = torch.cuda.stream(self.stream) if self.stream else contextlib.nullcontext()
        with stream, torch.inference_mode():
            yield

    def _autocast(self, cache: bool = True) -> contextlib.AbstractContextManager[object]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(
            self._torch_device.type, dtype=_DTYPES[self.precision], cache_enabled=cache
        )

    def _forward(self, images: torch.Tensor) -> Sequence[torch.Tensor]:
        with self._autocast():
            return self._module(images)

    def _graph_forward(self, images: torch.Tensor) -> Sequence[torch.Tensor]:
        # Autocast's cast cache must stay off while capturing (PyTorch's CUDA graph notes);
        # precast() already cast the weights it would hold, so the outputs are the same.
        with self._autocast(cache=False):
            return self._module(images)

    def prepare(self, max_batch_size: int, input_shape: tuple[int, ...]) -> None:
        """Capture one graph per batch bucket up to `max_batch_size`; a failure leaves it off."""
        if self._graph_factory is None:
            return
        spec = StaticSpec(max_batch_size, input_shape, torch.float32, self._torch_device)
        runner = self._graph_factory(self._graph_forward, spec)
        try:
            with self._on_device():
                runner.prepare()
        except Exception as exc:  # an op capture cannot record: serve, un-graphed, and say so
            log.error("%s on %s: graph capture failed, running un-graphed: %r",
                      self.name, self.device, exc)  # fmt: skip
            return
        self._graphs = runner
        self.cuda_graphs = True

    def _outputs(self, batch: Any) -> Sequence[torch.Tensor]:
        images = torch.as_tensor(batch).to(self._torch_device, non_blocking=True)
        if self._graphs is not None and images.shape[0] <= self._graphs.max_batch_size:
            return self._graphs(images)
        return self._forward(images)

    def infer(self, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        """Run a numpy batch, or a torch tensor already on this device."""
        with self._on_device():
            logits, embedding = self._outputs(batch)
            # .cpu() on this stream waits for it, so the result is complete when we return.
            return logits.float().cpu().numpy(), embedding.float().cpu().numpy()

    def infer_outputs(self, batch: Any, *, logits: bool) -> BatchOutputs:
        """Run a batch and postprocess it on the device; `logits`: bring the logits back too."""
        if self.device_top_k is None:
            raise BackendError("this instance postprocesses on the host; call infer()")
        with self._on_device():
            out_logits, embedding = self._outputs(batch)
            return postprocess(out_logits, embedding, top_k=self.device_top_k, want_logits=logits)

    def close(self) -> None:
        del self._module
        self._graphs = None
        if self._torch_device.type == "cuda":
            torch.cuda.empty_cache()


# Layers whose weights autocast casts to the reduced precision on every call.
_AUTOCAST_WEIGHTS = ("Linear", "Conv2d")


def precast(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast the Linear and Conv2d weights to `dtype` once, in place; return how many layers.

    Autocast rounds them to `dtype` anyway, on every call (its weight cache lives only inside
    one `with` block), so outputs are bit-identical and each call skips reading the fp32 weights
    and writing a copy: about 4 % of Hiera-T's bf16 forward on a 2-core CPU. LayerNorm and the
    rest keep float32, as autocast runs them. Works on traced TorchScript modules too.
    """
    cast = 0
    for layer in module.modules():
        kind = getattr(layer, "original_name", type(layer).__name__)  # TorchScript keeps names
        if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d) or kind in _AUTOCAST_WEIGHTS:
            layer.to(dtype)
            cast += 1
    return cast


def load_torchscript(
    path: Path,
    *,
    device: str,
    precision: str,
    graphs: GraphFactory | None = None,
    device_top_k: int | None = None,
) -> TorchBackend:
    """Load a traced `model.ts` onto `device`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "jit is deprecated"; still the format
        try:
            # Load on the CPU, then move: map_location would also move the trace's constants
            # (0-d tensors in its shape arithmetic) to the GPU, where mixing them with the
            # CPU sizes fails ("Expected all tensors to be on the same device", seen on an
            # H200); .to() below moves only parameters and buffers.
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise BackendError(f"cannot load TorchScript file {path}: {exc}") from exc
    return TorchBackend(
        module,
        name="torchscript",
        device=device,
        precision=precision,
        graphs=graphs,
        device_top_k=device_top_k,
    )

"""Replay ONNX Runtime's CUDA graphs, one per batch bucket, on fixed-address torch buffers.

With `enable_cuda_graph` (CUDA provider) or `trt_cuda_graph_enable` (TensorRT), ONNX Runtime
records the kernels of a run and replays them on later runs, provided every input and output
stays at the address it was captured with. So each bucket binds its own static input and
outputs (torch tensors on the instance's GPU) once, and runs with its own `gpu_graph_id` run
option, which tells ONNX Runtime which recorded graph a run belongs to. ONNX Runtime captures
on its own after a few ordinary runs of a graph id; `_capture` makes those runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from service.runtime.graphs import WARM_UP_RUNS, BucketRunner, StaticSpec

# ONNX tensor element types as ONNX Runtime names them, for the static output buffers.
_TORCH_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}


class OrtGraphs(BucketRunner):
    """Run an ONNX Runtime session per bucket on bound static buffers, one graph id each."""

    def __init__(self, session: Any, spec: StaticSpec) -> None:
        super().__init__(spec)
        self._session = session
        self._input_name = session.get_inputs()[0].name
        self._outputs_meta = [(o.name, o.shape[1], o.type) for o in session.get_outputs()]
        for name, width, kind in self._outputs_meta:
            if not isinstance(width, int) or kind not in _TORCH_DTYPES:
                raise ValueError(
                    f"output {name} is {kind} of shape [*, {width}]; graphs need float or "
                    "float16 outputs with a fixed number of columns"
                )
        self._runs: dict[int, tuple[Any, Any]] = {}

    def _capture(self, bucket: int, static: torch.Tensor) -> Sequence[torch.Tensor]:
        import onnxruntime as ort

        device = static.device
        outputs = [
            torch.empty((bucket, width), dtype=_TORCH_DTYPES[kind], device=device)
            for _, width, kind in self._outputs_meta
        ]
        binding = self._session.io_binding()
        _bind(binding.bind_input, self._input_name, static)
        for (name, _, _), out in zip(self._outputs_meta, outputs, strict=True):
            _bind(binding.bind_output, name, out)
        options = ort.RunOptions()
        # The bucket is the graph's id: unique per bucket, and readable in ORT's logs.
        options.add_run_config_entry("gpu_graph_id", str(bucket))
        self._runs[bucket] = (binding, options)
        for _ in range(WARM_UP_RUNS):  # ordinary runs, then the capture, then a replay
            self._replay(bucket)
        return outputs

    def _replay(self, bucket: int) -> None:
        binding, options = self._runs[bucket]
        self._session.run_with_iobinding(binding, options)


def _bind(bind: Any, name: str, tensor: torch.Tensor) -> None:
    device = tensor.device
    bind(
        name,
        device_type=device.type,
        device_id=device.index or 0,
        element_type=np.float16 if tensor.dtype == torch.float16 else np.float32,
        shape=tuple(tensor.shape),
        buffer_ptr=tensor.data_ptr(),
    )

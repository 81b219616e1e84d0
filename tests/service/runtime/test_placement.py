"""Instance N runs on the device planned for it, at every step, checked without a GPU.

With two GPUs every instance planned for `cuda:1` must be built for `cuda:1`, fed on `cuda:1`,
ask ONNX Runtime for device 1 and bind its inputs on device 1, or move its torch module to
`cuda:1`. A device index lost anywhere (say, forced to 0) would put every instance on the
first GPU: correct answers, half the throughput, and no error anywhere. The builders are run
here with recording stand-ins for what needs a real GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort
import pytest
import torch

import service.runtime.loader as loader
import service.runtime.onnx as onnx_module
import service.runtime.pool as pool_module
import service.runtime.torch_backends as torch_backends
from service.runtime import providers as ep
from service.runtime.loader import plan
from service.runtime.onnx import OnnxBackend
from service.runtime.pool import InputSpec, RuntimePool
from service.runtime.torch_backends import TorchBackend
from service.settings import Settings

TWO_GPUS = ["cuda:0", "cuda:1"]


class Built:
    """Record the device each backend factory was asked to build for."""

    def __init__(self) -> None:
        self.devices: list[str] = []

    def __call__(self, *args: Any, device: str, **kwargs: Any) -> str:
        self.devices.append(device)
        return device


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(loader, "runtime_gpu_support", lambda *args: "")
    monkeypatch.setattr(loader, "resolve_devices", lambda device, gpu_unusable: list(TWO_GPUS))
    # plan() sets torch's process-wide TF32 flags for the torch backends: put them back.
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.mark.parametrize(
    ("backend", "module", "builder"),
    [
        ("onnx", onnx_module, "OnnxBackend"),
        ("torchscript", torch_backends, "load_torchscript"),
        ("eager", torch_backends, "TorchBackend"),
    ],
)
@pytest.mark.usefixtures("two_gpus")
def test_the_plan_builds_every_instance_for_its_own_gpu(
    micro_repository: Path,
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
    module: object,
    builder: str,
) -> None:
    built = Built()
    monkeypatch.setattr(module, builder, built)
    settings = Settings(
        model_repository=micro_repository, backend=backend, device="cuda", instances_per_device=2
    )  # type: ignore[arg-type]

    instances = plan(settings).instances
    backends = [factory() for _, factory in instances]

    expected = ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert [device for device, _ in instances] == expected
    assert backends == built.devices == expected


class FakeBackend:
    name, precision, input_dtype = "fake", "fp32", "float32"

    def __init__(self, device: str) -> None:
        self.device = device
        self.batches = 0

    def infer(self, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        self.batches += 1
        return np.zeros((len(batch), 4), np.float32), np.zeros((len(batch), 2), np.float32)

    def close(self) -> None:
        pass


async def test_the_pool_feeds_each_instance_on_its_own_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fed_on: list[str] = []

    def feeder_for(backend: Any, device: str, inputs: InputSpec, max_batch_size: int) -> Any:
        fed_on.append(device)
        return list  # the batch as the list of items: no device memory needed

    monkeypatch.setattr(pool_module, "feeder_for", feeder_for)
    factories = [(device, lambda device=device: FakeBackend(device)) for device in TWO_GPUS]
    inputs = InputSpec((3, 8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    pool = await RuntimePool.start(factories, inputs=inputs, max_batch_size=2)  # type: ignore[arg-type]
    try:
        assert [i.device for i in pool.instances] == TWO_GPUS
        assert [i.backend.device for i in pool.instances] == TWO_GPUS
        assert fed_on == TWO_GPUS
        assert [i.backend.batches for i in pool.instances] == [2, 2]  # each warmed on its own
    finally:
        await pool.close(timeout=5)


class FakeBinding:
    def __init__(self) -> None:
        self.inputs: list[dict[str, Any]] = []

    def bind_input(self, name: str, **where: Any) -> None:
        self.inputs.append(where)

    def bind_output(self, name: str) -> None:
        pass

    def synchronize_inputs(self) -> None:
        pass

    def copy_outputs_to_cpu(self) -> list[np.ndarray]:
        return [np.zeros((2, 4), np.float32), np.zeros((2, 2), np.float32)]


class GpuSession:
    """ORT's session as it behaves when the CUDA provider starts: it echoes its options."""

    created: ClassVar[list[GpuSession]] = []

    def __init__(self, path: str, options: Any, providers: list[str], provider_options: Any):
        self.options = dict(zip(providers, provider_options, strict=True))
        self.binding = FakeBinding()
        GpuSession.created.append(self)

    def get_providers(self) -> list[str]:
        return list(self.options)

    def get_provider_options(self) -> dict[str, dict[str, str]]:
        return self.options

    def get_inputs(self) -> list[Any]:
        return [type("Input", (), {"name": "images", "type": "tensor(float)"})()]

    def get_outputs(self) -> list[Any]:
        return [type("Output", (), {"name": name})() for name in ("logits", "embedding")]

    def io_binding(self) -> FakeBinding:
        return self.binding

    def run_with_iobinding(self, binding: FakeBinding) -> None:
        pass


class CudaTensor:
    """What the feeder hands ORT on a GPU: a contiguous float32 tensor on `cuda:<index>`."""

    dtype = torch.float32
    shape = (2, 3, 224, 224)

    def __init__(self, index: int) -> None:
        self.device = torch.device("cuda", index)

    def contiguous(self) -> CudaTensor:
        return self

    def data_ptr(self) -> int:
        return 0x7F00


class FakeStream:
    cuda_stream = 1234

    def __init__(self, device: Any = None) -> None:
        self.device = device


def test_an_onnx_instance_on_cuda_1_asks_for_gpu_1_and_binds_its_inputs_there(
    micro_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [ep.CUDA, ep.CPU])
    monkeypatch.setattr(ort, "InferenceSession", GpuSession)
    monkeypatch.setattr(onnx_module, "_instance_stream", FakeStream)
    monkeypatch.setattr(onnx_module, "_preload_cuda_libraries", lambda ort: None)
    GpuSession.created.clear()

    backend = OnnxBackend(micro_repository / "model.onnx", device="cuda:1", precision="fp32")
    backend.infer(CudaTensor(1))

    (session,) = GpuSession.created
    assert session.options[ep.CUDA]["device_id"] == "1"
    (bound,) = session.binding.inputs
    assert (bound["device_type"], bound["device_id"]) == ("cuda", 1)
    assert bound["buffer_ptr"] == 0x7F00 and bound["shape"] == (2, 3, 224, 224)


class Module:
    """Enough of an nn.Module to see where the backend puts it."""

    def __init__(self) -> None:
        self.device: torch.device | None = None

    def to(self, device: torch.device) -> Module:
        self.device = device
        return self

    def eval(self) -> Module:
        return self


def test_a_torch_instance_on_cuda_1_moves_its_module_and_stream_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    module = Module()

    backend = TorchBackend(module, name="eager", device="cuda:1", precision="fp32")  # type: ignore[arg-type]

    assert module.device == torch.device("cuda", 1)
    assert isinstance(backend.stream, FakeStream)
    assert backend.stream.device == torch.device("cuda", 1)
    assert backend.provider == "torch-cuda"

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model.hiera import BuiltModel
from service.runtime import torch_backends


def test_torchscript_is_loaded_on_the_cpu_and_then_moved(
    micro_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """map_location=<gpu> also moves the trace's 0-d shape constants, which then meet CPU sizes
    ("Expected all tensors to be on the same device" on an H200); .to() moves only weights."""
    seen: list[Any] = []
    real_load = torch.jit.load

    def spy(path: str, map_location: Any = None, **kwargs: Any) -> Any:
        seen.append(map_location)
        return real_load(path, map_location=map_location, **kwargs)

    monkeypatch.setattr(torch.jit, "load", spy)
    backend = torch_backends.load_torchscript(
        micro_repository / "model.ts", device="cpu", precision="fp32"
    )
    assert seen == ["cpu"]
    logits, embedding = backend.infer(np.zeros((2, 3, 224, 224), np.float32))
    assert logits.shape[0] == embedding.shape[0] == 2


@pytest.mark.parametrize("kind", ["eager", "torchscript"])
def test_bf16_weights_are_cast_once_and_outputs_equal_autocast_bit_for_bit(
    micro_model: BuiltModel, micro_repository: Path, kind: str
) -> None:
    def fresh() -> torch.nn.Module:
        if kind == "eager":
            return copy.deepcopy(micro_model.module)
        return torch.jit.load(str(micro_repository / "model.ts"), map_location="cpu")

    batch = np.random.default_rng(7).standard_normal((2, 3, 224, 224), dtype=np.float32)
    reference = fresh().eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, expected = reference(torch.from_numpy(batch))  # what torch's autocast alone gives

    backend = torch_backends.TorchBackend(fresh(), name=kind, device="cpu", precision="bf16")
    _, embedding = backend.infer(batch)

    np.testing.assert_array_equal(embedding, expected.float().numpy())
    dtypes = dict(backend._module.named_parameters())
    linear = [n for n in dtypes if n.endswith(("qkv.weight", "fc1.weight", "proj.weight"))]
    norms = [n for n in dtypes if "norm" in n]
    assert linear and all(dtypes[n].dtype == torch.bfloat16 for n in linear)
    assert norms and all(dtypes[n].dtype == torch.float32 for n in norms)  # as autocast runs them

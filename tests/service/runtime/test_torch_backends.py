from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

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

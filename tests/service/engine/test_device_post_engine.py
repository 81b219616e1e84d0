"""An engine whose instances replay bucketed graphs and rank on their device, run on the CPU.

The loader gives torch backends graphs and device postprocessing on CUDA only; here it is made
to give them on the CPU (the graphs' stand-in runs the module on the same static buffers), so
the engine, the batcher and the answers are exercised end to end without a GPU.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from service.engine.core import Engine
from service.engine.state import Want
from service.metrics import Metrics
from service.postprocess import top_k
from service.runtime import loader
from service.runtime.graphs import StandIn
from service.settings import Settings
from tests.service.helpers import repository_settings

LABELS = [str(i) for i in range(1000)]


async def test_a_graphed_device_postprocessing_engine_answers_as_the_host_path(
    micro_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def everywhere(settings: Settings, device: str) -> loader.TorchGpuOptions:
        return {"graphs": StandIn, "device_top_k": settings.max_top_k}

    settings = repository_settings(micro_repository, backend="eager", max_batch_size=4)
    plain = Engine(settings, Metrics())
    await plain.load()
    monkeypatch.setattr(loader, "torch_gpu_options", everywhere)
    engine = Engine(settings, Metrics())
    await engine.load()
    try:
        info = engine.info()
        assert info["cuda_graphs"] and info["device_postprocess"]
        assert not plain.info()["cuda_graphs"] and not plain.info()["device_postprocess"]
        rng = np.random.default_rng(4)
        crops = [rng.integers(0, 256, (3, 224, 224), dtype=np.uint8) for _ in range(3)]
        wants = [Want(top_k=5), Want(top_k=5, logits=True), Want(embedding=True)]
        results = await asyncio.gather(
            *(engine.submit(c, None, w) for c, w in zip(crops, wants, strict=True))
        )
        for crop, result in zip(crops, results, strict=True):
            reference = await plain.submit(crop, None)  # one image alone: the host path
            assert result.outputs is not None and result.outputs.ranked is not None
            got = result.outputs.top_k(result.row, LABELS, 5)
            want = top_k(reference.logits, LABELS, 5)
            assert [p.index for p in got] == [p.index for p in want]
            np.testing.assert_allclose([p.score for p in got], [p.score for p in want], rtol=1e-4)
            np.testing.assert_allclose(result.embedding, reference.embedding, rtol=1e-4, atol=1e-5)
        assert results[1].logits.shape == (1000,)
        alone = await engine.submit(crops[0], None, Want(top_k=5))
        assert alone.logits.shape == (0,)  # nobody in its batch asked: left on the device
        assert alone.outputs is not None and alone.outputs.logits is None
    finally:
        await engine.close(deadline=asyncio.get_running_loop().time() + 5)
        await plain.close(deadline=asyncio.get_running_loop().time() + 5)

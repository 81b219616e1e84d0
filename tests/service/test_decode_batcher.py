"""The device decode batcher: no timer, batches grow under load, departed callers cost nothing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest
import torch

from service.decode_batcher import DecodeBatcher
from service.imaging.device import DecodedBatch
from service.imaging.errors import CorruptImage


class GatedDecoder:
    """Decodes b"n" to a tensor filled with n; b"bad" is corrupt; waits for `gate` if set."""

    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []
        self.gate = threading.Event()
        self.gate.set()

    def decode_batch(self, uploads: Sequence[bytes]) -> DecodedBatch:
        self.gate.wait(5)
        self.batches.append(list(uploads))
        crops: list[torch.Tensor | CorruptImage] = [
            CorruptImage("broken") if u == b"bad" else torch.full((3, 2, 2), int(u))
            for u in uploads
        ]
        return DecodedBatch(crops, 0.001, 0.002, 0)


def batcher(decoder: GatedDecoder, max_batch_size: int = 8) -> DecodeBatcher:
    return DecodeBatcher(decoder, max_batch_size=max_batch_size)  # type: ignore[arg-type]


async def test_each_caller_gets_its_own_crop_and_errors_stay_with_their_upload() -> None:
    decoder = GatedDecoder()
    stage = batcher(decoder)
    results = await asyncio.gather(
        stage.decode(b"1"), stage.decode(b"bad"), stage.decode(b"3"), return_exceptions=True
    )
    stage.close()

    assert int(results[0].pixels[0, 0, 0]) == 1  # type: ignore[union-attr]
    assert isinstance(results[1], CorruptImage)
    assert int(results[2].pixels[0, 0, 0]) == 3  # type: ignore[union-attr]
    assert results[0].decode_seconds == 0.001  # type: ignore[union-attr]


async def test_uploads_arriving_during_a_decode_form_the_next_batch() -> None:
    decoder = GatedDecoder()
    decoder.gate.clear()
    stage = batcher(decoder, max_batch_size=3)
    first = asyncio.create_task(stage.decode(b"1"))
    await asyncio.sleep(0.05)  # the first batch is now inside the (gated) decoder
    rest = [asyncio.create_task(stage.decode(str(n).encode())) for n in range(2, 7)]
    await asyncio.sleep(0)
    decoder.gate.set()
    await asyncio.gather(first, *rest)
    stage.close()

    assert decoder.batches == [[b"1"], [b"2", b"3", b"4"], [b"5", b"6"]]


async def test_a_caller_that_left_is_never_decoded() -> None:
    decoder = GatedDecoder()
    decoder.gate.clear()
    stage = batcher(decoder)
    first = asyncio.create_task(stage.decode(b"1"))
    await asyncio.sleep(0.05)
    gone = asyncio.create_task(stage.decode(b"2"))
    kept = asyncio.create_task(stage.decode(b"3"))
    await asyncio.sleep(0)
    gone.cancel()
    decoder.gate.set()
    await asyncio.gather(first, kept)
    stage.close()

    assert decoder.batches == [[b"1"], [b"3"]]
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_a_decoder_crash_fails_its_batch_and_the_next_batch_still_runs() -> None:
    class Crashing(GatedDecoder):
        def decode_batch(self, uploads: Sequence[bytes]) -> DecodedBatch:
            if uploads == [b"9"]:
                raise RuntimeError("nvjpeg handle lost")
            return super().decode_batch(uploads)

    stage = batcher(Crashing())
    with pytest.raises(RuntimeError, match="device decode failed"):
        await stage.decode(b"9")
    assert int((await stage.decode(b"4")).pixels[0, 0, 0]) == 4
    stage.close()

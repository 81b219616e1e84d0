"""Batch JPEG uploads for the device decoder, which runs on a thread of its own.

No timer: while one batch decodes, new uploads queue, and they all go as the next batch. At
low load an upload is decoded at once; under load batches grow by themselves. An upload whose
client has gone (its future cancelled) is dropped before it is decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.imaging.device import DecodedBatch, TensorDecoder
from service.imaging.errors import ImageError
from service.imaging.preprocessing import Preprocessing

if TYPE_CHECKING:
    import torch

    from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceCrop:
    """One upload's crop on the device, with the time its batch took."""

    pixels: torch.Tensor
    decode_seconds: float
    preprocess_seconds: float


@dataclass(eq=False)
class _Upload:
    data: bytes
    future: asyncio.Future[DeviceCrop]


class DecodeBatcher:
    """Feed `TensorDecoder.decode_batch` from many concurrent requests."""

    def __init__(self, decoder: TensorDecoder, *, max_batch_size: int) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.decoder = decoder
        self._max_batch_size = max_batch_size
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="hiera-device-decode")
        self._waiting: list[_Upload] = []
        self._busy = False
        self.batches = 0
        self.fallbacks = 0

    async def decode(self, data: bytes) -> DeviceCrop:
        """Decode and crop one JPEG on the device; raises the ImageError that refused it."""
        upload = _Upload(data, asyncio.get_running_loop().create_future())
        self._waiting.append(upload)
        if not self._busy:
            self._start_next()
        return await upload.future

    def close(self) -> None:
        """Stop the decode thread; uploads still waiting are failed by their callers' close."""
        self._thread.shutdown(wait=False, cancel_futures=True)

    def _start_next(self) -> None:
        self._waiting = [u for u in self._waiting if not u.future.done()]  # callers gone
        if not self._waiting:
            return
        batch = self._waiting[: self._max_batch_size]
        del self._waiting[: len(batch)]
        self._busy = True
        work = self._thread.submit(self.decoder.decode_batch, [u.data for u in batch])
        loop = asyncio.get_running_loop()

        def hand_back(done: Future[DecodedBatch]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed while shutting down
                loop.call_soon_threadsafe(self._finish, batch, done)

        work.add_done_callback(hand_back)

    def _finish(self, batch: list[_Upload], done: Future[DecodedBatch]) -> None:
        self._busy = False
        try:
            result = done.result()
        except BaseException as exc:  # a decoder crash fails its batch, not the service
            log.error("device decode batch failed: %r", exc, exc_info=exc)
            for upload in batch:
                if not upload.future.done():
                    upload.future.set_exception(RuntimeError(f"device decode failed: {exc!r}"))
        else:
            self.batches += 1
            self.fallbacks += result.cpu_fallbacks
            for upload, crop in zip(batch, result.crops, strict=True):
                if upload.future.done():
                    continue
                if isinstance(crop, ImageError):
                    upload.future.set_exception(crop)
                else:
                    upload.future.set_result(
                        DeviceCrop(crop, result.decode_seconds, result.preprocess_seconds)
                    )
        if self._waiting:
            self._start_next()


def start_device_decoder(
    settings: Settings, pp: Preprocessing, model_device: str, where: str | None = None
) -> DecodeBatcher | None:
    """Build the JPEG decoder where the model runs, if --decode-device puts decoding there.

    `where` overrides the device (tests use "cpu" to run the device path without a GPU).
    Returns None when JPEGs decode on the CPU with Pillow.
    """
    if where is None:
        wanted = settings.decode_device
        if wanted == "cuda" and model_device == "cpu":
            from service.runtime.base import BackendError

            raise BackendError(
                "--decode-device cuda, but the model runs on the CPU (no usable GPU); "
                "use --decode-device cpu or auto"
            )
        on_gpu = model_device.startswith("cuda")
        where = model_device if wanted != "cpu" and on_gpu else None
    if where is None:
        return None
    decoder = TensorDecoder(
        pp, where, max_pixels=settings.max_image_pixels, decoder=settings.device_decoder
    )
    log.info("JPEG decode: batched on %s with %s; other formats on the CPU", where,
             decoder.decoder_name)  # fmt: skip
    return DecodeBatcher(decoder, max_batch_size=settings.max_batch_size)

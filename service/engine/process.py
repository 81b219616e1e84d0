"""The engine process: one model owner fed by every front end over the corridor.

`python -m service.engine.process --socket PATH --settings JSON` loads the model, then listens
on a Unix socket. Each front end that connects gets the model card, the board (capacity, pace,
health) and a cell on it; it sends its slots' memory back. From then on it sends SUBMIT and
CANCEL frames and gets one RESULT per SUBMIT, the outputs written into the input's slot.
With device decode (--decode-device cuda, or auto with the model on a GPU) the engine also
takes JPEG bytes (the JPEGS pool), decodes and crops them in batches on its device, then
queues the crops like any other input.

A front end that goes away has its queued inputs dropped and its cell cleared once none of its
inputs is left in the engine. SIGTERM drains: queued and running work finishes within the drain
timeout; the process exits 0 (LOAD_FAILED if the model never loaded, RUNTIME_BROKEN if the
runtime broke, so the supervisor restarts it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence

import numpy as np

from service.decode_batcher import DecodeBatcher, start_device_decoder
from service.engine import wire
from service.engine.core import Engine
from service.engine.link import Link
from service.engine.shm import MAX_FRONT_ENDS, Board, SlotLayout, Slots
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)

LOAD_FAILED = 3
RUNTIME_BROKEN = 4
BEAT_S = 0.25  # how often the board's heartbeat and pace are refreshed
HANDSHAKE_TIMEOUT_S = 10.0


class EngineServer:
    """Load the engine, then serve front ends on a Unix socket until stopped."""

    def __init__(
        self,
        settings: Settings,
        path: str,
        metrics: Metrics | None = None,
        *,
        decode_on: str | None = None,
    ) -> None:
        """`decode_on` puts the JPEG decoder on that device whatever --decode-device says
        (tests use "cpu" to run device decode without a GPU)."""
        self.settings = settings
        self.path = path
        self.metrics = metrics or Metrics(workers=settings.workers, shared=True)
        self.board = Board.create(generation=os.getpid())
        self.broken: BaseException | None = None
        self.engine = Engine(settings, self.metrics, on_state=self._state, on_broken=self._broken)
        self.decoder: DecodeBatcher | None = None  # set at load when JPEGs decode here
        self._decode_on = decode_on
        self.links: dict[int, Link | None] = {}  # None: reserved during a handshake
        self._serving: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()

    def _state(self, state: str, reason: str) -> None:
        self.board.set_state(state)

    def _broken(self, exc: BaseException) -> None:
        self.broken = exc
        self._stop.set()

    def stop(self) -> None:
        """Begin draining (what SIGTERM does)."""
        self._stop.set()

    async def run(self, *, signals: bool = True) -> int:
        """Load, serve until stopped, drain; return the process's exit status."""
        loop = asyncio.get_running_loop()
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
        beat = loop.create_task(self._beat())
        try:
            await self.engine.load()
            card = self.engine.card
            assert card is not None
            self.decoder = await asyncio.to_thread(
                start_device_decoder, self.settings, card.preprocessing,
                self.engine.model_device, self._decode_on,
            )  # fmt: skip
        except Exception as exc:
            if self.engine.state == "ready":  # the model loaded; the JPEG decoder did not
                log.error("cannot start the JPEG decoder: %s", exc)
                await self.engine.close(time.monotonic())
            beat.cancel()
            return LOAD_FAILED
        self._publish()
        gc.collect()
        gc.freeze()  # torch's long-lived objects, never scanned again
        listener = _listen(self.path)
        accept = loop.create_task(self._accept(listener))
        log.info("engine ready on %s (capacity %d)", self.path, self.engine.capacity)
        await self._stop.wait()
        accept.cancel()
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        deadline = time.monotonic() + self.settings.drain_timeout_s
        # JPEGs still decoding are work accepted like queued inputs: let them reach the model.
        decoding = [task for link in self.links.values() if link is not None
                    for task in link.inputs.values() if isinstance(task, asyncio.Task)]  # fmt: skip
        if decoding:
            self.board.set_state("draining")  # front ends stop admitting meanwhile
            await asyncio.wait(decoding, timeout=max(deadline - time.monotonic(), 0.0))
        await self.engine.close(deadline)
        if self.decoder is not None:
            self.decoder.close()
        beat.cancel()
        for link in list(self.links.values()):
            if link is not None:
                link.close()
        if self.broken is not None:
            return RUNTIME_BROKEN
        return 0

    def _publish(self) -> None:
        engine = self.engine
        self.board.publish(
            capacity=engine.capacity,
            image_seconds=engine.image_seconds,
            drain_rate=engine.drain_rate,
        )

    async def _beat(self) -> None:
        while True:
            self.board.beat()
            if self.engine.batcher is not None:
                self._publish()
            await asyncio.sleep(BEAT_S)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = loop.create_task(self._serve(conn))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            cell = next(i for i in range(MAX_FRONT_ENDS) if i not in self.links)
        except StopIteration:
            log.error("more than %d front ends; refusing one", MAX_FRONT_ENDS)
            conn.close()
            return
        self.links[cell] = None
        try:
            try:
                pid, pools = await asyncio.to_thread(self._handshake, conn, cell)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("a front end's handshake failed: %s", exc)
                conn.close()
                return
            conn.setblocking(False)
            link = Link(self.engine, self.board, cell, pools, pid, self.decoder)
            await asyncio.get_running_loop().create_unix_connection(lambda: link, sock=conn)
            self.links[cell] = link
            log.info("front end pid %d connected (cell %d)", pid, cell)
            await link.gone
        finally:
            self.links.pop(cell, None)

    def info(self) -> dict[str, object]:
        """Return the engine's info, with where it decodes JPEGs (None: front ends decode)."""
        decoder = self.decoder.decoder if self.decoder is not None else None
        return {
            **self.engine.info(),
            "jpeg_device": decoder.device if decoder is not None else None,
            "jpeg_decoder": decoder.decoder_name if decoder is not None else None,
        }

    def _handshake(self, conn: socket.socket, cell: int) -> tuple[int, dict[int, Slots]]:
        conn.settimeout(HANDSHAKE_TIMEOUT_S)
        card = self.engine.card
        assert card is not None
        hello = {
            "card": card.to_dict(),
            "info": self.info(),
            "cell": cell,
            "capacity": self.engine.capacity,
            "max_k": min(self.settings.max_top_k, card.num_classes),
        }
        wire.send_hello(conn, hello, [self.board.fd])
        attach, fds = wire.recv_hello(conn)
        pools: dict[int, Slots] = {}
        for fd, spec in zip(fds, attach["pools"], strict=True):
            layout = SlotLayout.from_dict(spec["layout"])
            pools[spec["pool"]] = Slots.attach(fd, layout, spec["count"])
            os.close(fd)  # the mapping keeps the memory
        return int(attach["pid"]), pools


def _listen(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(MAX_FRONT_ENDS)
    sock.setblocking(False)
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    """Run an engine process until SIGTERM; see the module docstring for the exit status."""
    parser = argparse.ArgumentParser(prog="hiera-serve engine")
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    parser.add_argument("--settings", required=True, help="Settings as JSON")
    args = parser.parse_args(argv)
    settings = Settings.model_validate_json(args.settings)
    from service.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    from service.workers import exit_with_parent

    exit_with_parent(os.getppid())
    server = EngineServer(settings, args.socket)
    try:
        import uvloop

        status = uvloop.run(server.run())
    except ImportError:
        status = asyncio.run(server.run())
    if server.engine.abandoned_threads or status == RUNTIME_BROKEN:
        logging.shutdown()
        os._exit(status)
    return status


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())

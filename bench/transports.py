"""`python -m bench.transports`: what a corridor frame costs over a Unix socket and over ZeroMQ.

The measurement behind the corridor's choice of transport. A client sends 32-byte frames at a
fixed rate to an echo server in another process and waits for each echo, once over an asyncio
Unix stream socket (protocol callbacks, as service.engine uses) and once over pyzmq's asyncio
DEALER/ROUTER on `ipc://`; both processes run uvloop. It prints the CPU microseconds per round
trip in each process, above a client loop that sends nothing. pyzmq is not a dependency of
hiera-serve: `pip install pyzmq` first.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.split import cpu_seconds

FRAMES = 20_000
RATE = 2_000.0  # frames per second, paced like requests


def _unix_echo(path: str) -> None:
    import uvloop

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)  # type: ignore[attr-defined]

    async def main() -> None:
        await asyncio.get_running_loop().create_unix_server(Echo, path)
        await asyncio.sleep(3600)

    uvloop.run(main())


def _zmq_echo(address: str) -> None:
    import uvloop
    import zmq
    import zmq.asyncio

    async def main() -> None:
        sock = zmq.asyncio.Context().socket(zmq.ROUTER)
        sock.bind(address)
        while True:
            await sock.send_multipart(await sock.recv_multipart())

    uvloop.run(main())


Send = Callable[[int], Awaitable[None]]


async def _unix_client(path: str) -> Send:
    loop = asyncio.get_running_loop()
    waiting: dict[int, asyncio.Future[None]] = {}

    class Client(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            for start in range(0, len(data), 32):
                done = waiting.pop(int.from_bytes(data[start : start + 4], "little"), None)
                if done is not None:
                    done.set_result(None)

    transport, _ = await loop.create_unix_connection(Client, path)

    async def send(i: int) -> None:
        waiting[i] = done = loop.create_future()
        transport.write(i.to_bytes(4, "little") + bytes(28))
        await done

    return send


async def _zmq_client(address: str) -> Send:
    import zmq
    import zmq.asyncio

    loop = asyncio.get_running_loop()
    sock = zmq.asyncio.Context().socket(zmq.DEALER)
    sock.connect(address)
    waiting: dict[int, asyncio.Future[None]] = {}

    async def read() -> None:
        while True:
            frame = await sock.recv()
            done = waiting.pop(int.from_bytes(frame[:4], "little"), None)
            if done is not None:
                done.set_result(None)

    reader = asyncio.ensure_future(read())

    async def send(i: int) -> None:
        waiting[i] = done = loop.create_future()
        await sock.send(i.to_bytes(4, "little") + bytes(28))
        await done

    send.reader = reader  # type: ignore[attr-defined]  # kept alive with the client
    return send


async def _measure(send: Send, server: int) -> tuple[float, float]:
    async def nothing(_: int) -> None:
        return None

    async def window(each: Send) -> tuple[float, float]:
        mine, theirs = time.process_time(), cpu_seconds(server)
        began, tasks = time.perf_counter(), []
        for i in range(FRAMES):
            await asyncio.sleep(max(0.0, began + i / RATE - time.perf_counter()))
            tasks.append(asyncio.ensure_future(each(i)))
        await asyncio.gather(*tasks)
        return time.process_time() - mine, cpu_seconds(server) - theirs

    await window(send)  # warm
    idle = await window(nothing)
    busy = await window(send)
    return 1e6 * (busy[0] - idle[0]) / FRAMES, 1e6 * (busy[1] - idle[1]) / FRAMES


async def _run(
    client: Callable[[str], Awaitable[Send]], address: str, server: int
) -> tuple[float, float]:
    return await _measure(await client(address), server)


def main() -> int:
    import uvloop

    folder = Path(tempfile.mkdtemp(prefix="hiera-transports-"))
    cases = [
        ("unix socket", _unix_echo, str(folder / "echo.sock"), _unix_client),
        ("zmq ipc", _zmq_echo, f"ipc://{folder / 'echo.zmq'}", _zmq_client),
    ]
    context = multiprocessing.get_context("spawn")
    for name, echo, address, client in cases * 2:  # twice, alternating
        server = context.Process(target=echo, args=(address,))
        server.start()
        time.sleep(1.5)

        mine, theirs = uvloop.run(_run(client, address, server.pid or 0))
        print(f"{name:12} client {mine:6.1f} us, server {theirs:6.1f} us per round trip "
              f"({RATE:.0f} frames/s)")  # fmt: skip
        server.terminate()
        server.join()
        for leftover in folder.glob("echo.*"):
            os.unlink(leftover)
    folder.rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`hiera-serve`: parse flags and env into Settings, then run uvicorn."""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import CliApp

from service.settings import Settings

RUNTIME_BROKEN = 4  # exit status of a process whose model runtime broke after loading


def serve_main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM; exit 1 if the model cannot be loaded."""
    from service.logs import configure_logging

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = CliApp.run(Settings, cli_args=args)
    except ValidationError as exc:
        print(f"hiera-serve: invalid configuration: {_describe(exc)}", file=sys.stderr)
        return 2
    if problem := _missing_paths(settings):
        print(f"hiera-serve: invalid configuration: {problem}", file=sys.stderr)  # before binding
        return 2
    configure_logging(settings.log_format, settings.log_level)
    from service.workers import runs_engines, supervise

    if settings.workers > 1 or runs_engines(settings):
        return supervise(settings)
    return 1 if serve(settings) else 0


def serve(
    settings: Settings,
    sock: socket.socket | None = None,
    *,
    exit_when_broken: bool = False,
    metrics_listener: bool = True,
) -> bool:
    """Run one server process until SIGINT/SIGTERM; return True if the model failed to load.

    Without `sock` uvicorn binds `settings.host:port` itself; a worker passes its own socket.
    With `exit_when_broken` (a worker under the supervisor) a runtime that breaks for good ends
    the process with RUNTIME_BROKEN, so the supervisor restarts it; alone, the process stays up
    with liveness failing, for the orchestrator to restart.
    """
    import uvicorn

    from service.app import create_app
    from service.server import DrainingServer

    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    broken: list[BaseException] = []

    def on_fatal(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    def on_broken(exc: BaseException) -> None:
        broken.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(
        settings,
        on_fatal=on_fatal,
        on_broken=on_broken if exit_when_broken else None,
        metrics_listener=metrics_listener,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        # "auto" takes uvloop and httptools, both dependencies: they cut the event loop's
        # CPU per request (docs/how-it-works.md, "Front-end cost").
        loop="auto",
        http="auto",
        log_config=None,  # keep our JSON/text logging
        access_log=False,  # per-request data lives in /metrics; ids go in X-Request-ID
        timeout_graceful_shutdown=int(settings.drain_timeout_s) + 5,
    )
    server = DrainingServer(config, drain=app.state.service.drain)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler it found
    # here; a no-op one lets a graceful shutdown end with exit status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    # torch, timm and friends leave ~400k long-lived objects; every full collection walked
    # them all (0.19 s here). Frozen, they are never scanned again.
    gc.collect()
    gc.freeze()
    server.run(sockets=None if sock is None else [sock])
    status = RUNTIME_BROKEN if broken else (1 if failed else 0)
    if app.state.service.abandoned_threads or broken:
        # A hung model thread would be joined at interpreter exit, for as long as it hangs.
        logging.shutdown()
        os._exit(status)
    return bool(failed)


def _describe(exc: ValidationError) -> str:
    """Render validation errors as one line each, without pydantic's boilerplate."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"--{where.replace('_', '-')}: {message}" if where else message)
    return "; ".join(problems)


def _missing_paths(settings: Settings) -> str | None:
    repository = settings.model_repository
    if repository is not None and not repository.exists():
        return f"--model-repository {repository} does not exist; run hiera-export first"
    weights = settings.weights
    is_path = repository is None and weights not in (None, "pretrained", "random")
    if is_path and not Path(str(weights)).expanduser().is_file():
        return f"--weights {weights} is not a file (nor 'pretrained' or 'random')"
    return None


if __name__ == "__main__":
    sys.exit(serve_main())

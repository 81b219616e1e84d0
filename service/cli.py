"""`hiera-serve`: parse flags and env into Settings, then run uvicorn."""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

from pydantic import ValidationError
from pydantic_settings import CliApp


def serve_main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM; exit 1 if the model cannot be loaded."""
    import uvicorn

    from service.app import create_app
    from service.logs import configure_logging
    from service.settings import Settings

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = CliApp.run(Settings, cli_args=args)
    except ValidationError as exc:
        print(f"hiera-serve: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)

    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_fatal(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep our JSON/text logging
        access_log=False,  # per-request data lives in /metrics; ids go in X-Request-ID
        timeout_graceful_shutdown=int(settings.drain_timeout_s) + 5,
    )
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler it found
    # here; a no-op one lets a graceful shutdown end with exit status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(serve_main())

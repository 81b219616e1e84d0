"""An engine process whose model fails, stalls or hangs on command (tests only).

The supervisor of `tests.service.fault_server` starts this instead of service.engine.process:
the same engine, with every instance wrapped in a CommandedBackend (tests/service/fault_server).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.service.fault_server import CONTROL_ENV, install


def main() -> int:
    from service.engine.process import main as engine_main

    install(Path(os.environ[CONTROL_ENV]))
    return engine_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

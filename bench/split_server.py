"""`hiera-serve` whose engine processes sleep instead of running a model (`hiera-bench --split`).

The supervisor is the real one; only the module its engines run is swapped for
bench/noop_engine.py, here in the benchmark. Flags are hiera-serve's.
"""

from __future__ import annotations

import sys


def main() -> int:
    import service.workers
    from service.cli import serve_main

    service.workers.ENGINE_MODULE = "bench.noop_engine"
    return serve_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

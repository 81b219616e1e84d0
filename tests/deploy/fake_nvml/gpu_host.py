"""Run the real `hiera-serve` CLI as if its model instance sat on the fake NVML's GPU.

The model runs on the CPU (there is no GPU here); only the CUDA device -> UUID lookup, which
needs a real GPU, answers with the fake GPU's UUID, so the real NVML collector exports the
gauges a GPU host has and the dashboard and Prometheus checks can query them.
"""

from __future__ import annotations

import sys

import pynvml  # the fake beside this file, first on PYTHONPATH

import service.engine.core
from service.cli import serve_main

service.engine.core.cuda_uuids = lambda devices: {"cuda:0": pynvml.UUID}

if __name__ == "__main__":
    sys.exit(serve_main())

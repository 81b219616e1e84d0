"""Regenerate the gRPC modules from the .proto files beside this file (needs grpcio-tools)."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
PROTOS = ("grpc_service.proto", "model_config.proto")
# What protoc writes for one proto, and keep here (model_config defines no service).
OUTPUTS = ("grpc_service_pb2.py", "grpc_service_pb2.pyi", "grpc_service_pb2_grpc.py",
           "model_config_pb2.py", "model_config_pb2.pyi")  # fmt: skip


def generate(out: Path) -> list[Path]:
    """Run protoc on PROTOS into `out`; return the files kept, imports made package-relative.

    protoc writes `import model_config_pb2`, a top-level module; here they live in this
    package, so the import names it.
    """
    from grpc_tools import protoc  # dev dependency: only regenerating needs it

    with tempfile.TemporaryDirectory() as scratch:
        args = [f"-I{HERE}", f"--python_out={scratch}", f"--pyi_out={scratch}",
                f"--grpc_python_out={scratch}", *(str(HERE / p) for p in PROTOS)]  # fmt: skip
        if protoc.main(["protoc", *args]) != 0:
            raise RuntimeError("protoc failed on " + ", ".join(PROTOS))
        written = []
        for name in OUTPUTS:
            text = (Path(scratch) / name).read_text()
            text = re.sub(
                r"^import (\w+_pb2) as", rf"from {__package__} import \1 as", text, flags=re.M
            )
            target = out / name
            target.write_text(text)
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(path)

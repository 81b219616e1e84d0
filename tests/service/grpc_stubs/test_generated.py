"""The vendored gRPC modules are what grpcio-tools makes of the vendored .proto files, and
describe the same protocol tritonclient speaks."""

from __future__ import annotations

from pathlib import Path

from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton_service

from service.grpc_stubs import grpc_service_pb2, model_config_pb2
from service.grpc_stubs.regenerate import HERE, OUTPUTS, generate


def test_the_vendored_modules_are_the_generated_ones(tmp_path: Path) -> None:
    written = generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(OUTPUTS)
    for path in written:
        assert path.read_text() == (HERE / path.name).read_text(), (
            f"{path.name} differs from a fresh generation: run "
            "`python -m service.grpc_stubs.regenerate`"
        )


def test_the_protocol_is_tritonclients() -> None:
    # Same descriptors byte for byte: same messages, fields, numbers and service methods.
    assert grpc_service_pb2.DESCRIPTOR.serialized_pb == triton_service.DESCRIPTOR.serialized_pb
    assert model_config_pb2.DESCRIPTOR.serialized_pb == triton_config.DESCRIPTOR.serialized_pb
    methods = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
    assert {"ModelInfer", "ModelConfig", "ModelStatistics"} <= {m.name for m in methods}

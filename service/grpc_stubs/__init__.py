"""Generated code for the Open Inference Protocol's gRPC service, as Triton defines it.

`grpc_service.proto` and `model_config.proto` are copied unchanged from
triton-inference-server/common (protobuf/, commit 83adf7cf88a2f343005974dff3728be746de2d66);
the `*_pb2*` modules beside them are what `python -m service.grpc_stubs.regenerate` makes
of them with grpcio-tools. tests/service/grpc_stubs checks that they still match.
"""

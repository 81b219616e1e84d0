"""Tests for Settings: HIERA_* env vars, CLI flags, validation, and `hiera-serve` exit codes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
from pydantic import ValidationError
from pydantic_settings import CliApp

import service.app
import service.logs
from service.cli import serve_main
from service.settings import Settings

pytestmark = pytest.mark.timeout(20)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drop any HIERA_* variable of the surrounding shell so each test controls its inputs."""
    for name in list(os.environ):
        if name.upper().startswith("HIERA_"):
            monkeypatch.delenv(name)


def from_cli(*args: str) -> Settings:
    return CliApp.run(Settings, cli_args=list(args))


# --- sources: env vars and CLI flags ----------------------------------------------------------


def test_defaults_when_only_weights_are_given() -> None:
    settings = Settings(weights="random")

    assert settings.backend == "onnx"
    assert settings.device == "auto"
    assert settings.precision == "fp32"
    assert settings.max_batch_size == 8
    assert settings.instances_per_device == 1
    assert settings.model_repository is None
    assert settings.export_dir == Path("model_repository")


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 2), (16, 4)])
def test_decode_threads_default_to_the_cores_at_most_four(
    monkeypatch: pytest.MonkeyPatch, cores: int, threads: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(cores)))

    assert Settings(weights="random").decode_threads == threads
    assert Settings(weights="random", decode_threads=8).decode_threads == 8


def test_env_vars_with_the_hiera_prefix_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIERA_WEIGHTS", "random")
    monkeypatch.setenv("HIERA_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("HIERA_MAX_DELAY_MS", "2.5")
    monkeypatch.setenv("HIERA_BACKEND", "torchscript")
    monkeypatch.setenv("HIERA_DEVICE", "cpu")
    monkeypatch.setenv("HIERA_ONNX_PROVIDERS", '["CPUExecutionProvider"]')

    settings = Settings()

    assert settings.weights == "random"
    assert settings.max_batch_size == 16
    assert settings.max_delay_ms == 2.5
    assert settings.backend == "torchscript"
    assert settings.device == "cpu"
    assert settings.onnx_providers == ["CPUExecutionProvider"]


def test_env_var_names_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("hiera_weights", "random")
    monkeypatch.setenv("hiera_port", "9001")

    settings = Settings()

    assert settings.port == 9001


def test_env_var_model_repository_is_a_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HIERA_MODEL_REPOSITORY", str(tmp_path))

    settings = Settings()

    assert settings.model_repository == tmp_path
    assert settings.weights is None


def test_cli_kebab_case_flags_are_parsed() -> None:
    settings = from_cli(
        "--weights",
        "random",
        "--max-batch-size",
        "4",
        "--instances-per-device",
        "3",
        "--backend",
        "eager",
        "--precision",
        "bf16",
        "--export-dir",
        "/tmp/exports",
        "--request-timeout-s",
        "1.5",
    )

    assert settings.weights == "random"
    assert settings.max_batch_size == 4
    assert settings.instances_per_device == 3
    assert settings.backend == "eager"
    assert settings.precision == "bf16"
    assert settings.export_dir == Path("/tmp/exports")
    assert settings.request_timeout_s == 1.5


def test_cli_flags_override_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIERA_WEIGHTS", "random")
    monkeypatch.setenv("HIERA_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("HIERA_PORT", "9000")

    settings = from_cli("--max-batch-size", "4")

    assert settings.max_batch_size == 4  # the flag wins
    assert settings.port == 9000  # the env var still fills what the flags leave out
    assert settings.weights == "random"


def test_cli_flag_overrides_a_list_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIERA_WEIGHTS", "random")
    monkeypatch.setenv("HIERA_ONNX_PROVIDERS", '["CPUExecutionProvider"]')

    settings = from_cli("--onnx-providers", '["CUDAExecutionProvider","CPUExecutionProvider"]')

    assert settings.onnx_providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_cli_env_value_can_satisfy_validation_with_flags_for_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HIERA_BACKEND", "eager")

    settings = from_cli("--weights", "random", "--precision", "bf16")

    assert (settings.backend, settings.precision) == ("eager", "bf16")


# --- validation -------------------------------------------------------------------------------


def test_nothing_to_serve_is_rejected_with_a_hint() -> None:
    with pytest.raises(ValidationError) as info:
        Settings()

    message = str(info.value)
    assert "nothing to serve" in message
    assert "--model-repository" in message
    assert "--weights" in message


def test_model_repository_alone_is_enough(tmp_path: Path) -> None:
    settings = Settings(model_repository=tmp_path)

    assert settings.model_repository == tmp_path


@pytest.mark.parametrize("backend", ["torchscript", "eager"])
def test_bf16_is_allowed_with_torch_backends(backend: str) -> None:
    settings = Settings(weights="random", backend=backend, precision="bf16")

    assert settings.precision == "bf16"


def test_bf16_with_onnx_is_rejected_with_a_hint() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(weights="random", backend="onnx", precision="bf16")

    message = str(info.value)
    assert "bf16" in message
    assert "torchscript or eager" in message


def test_bf16_with_onnx_from_env_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIERA_WEIGHTS", "random")
    monkeypatch.setenv("HIERA_PRECISION", "bf16")

    with pytest.raises(ValidationError, match="bf16"):
        Settings()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_batch_size", 0),
        ("max_batch_size", 1025),
        ("instances_per_device", 0),
        ("instances_per_device", 65),
        ("max_delay_ms", -1.0),
        ("request_timeout_s", 0.0),
        ("max_queue_size", 0),
        ("decode_threads", 0),
        ("max_body_bytes", 1023),
        ("intra_op_threads", -1),
        ("port", 65536),
        ("max_top_k", 0),
    ],
)
def test_out_of_bounds_numbers_are_rejected(field: str, value: float) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(weights="random", **{field: value})

    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [(field,)]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_batch_size", 1),
        ("max_batch_size", 1024),
        ("instances_per_device", 64),
        ("max_delay_ms", 0.0),
        ("max_body_bytes", 1024),
        ("port", 0),
    ],
)
def test_bounds_are_inclusive(field: str, value: float) -> None:
    settings = Settings(weights="random", **{field: value})

    assert getattr(settings, field) == value


def test_max_batch_size_zero_from_env_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIERA_WEIGHTS", "random")
    monkeypatch.setenv("HIERA_MAX_BATCH_SIZE", "0")

    with pytest.raises(ValidationError, match="max_batch_size"):
        Settings()


@pytest.mark.parametrize(
    ("field", "value"), [("backend", "tensorflow"), ("device", "tpu"), ("precision", "int4")]
)
def test_unknown_choices_are_rejected(field: str, value: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(weights="random", **{field: value})

    assert info.value.errors()[0]["loc"] == (field,)


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="max_batch"):
        Settings(weights="random", max_batch=4)  # type: ignore[call-arg]


# --- hiera-serve exit codes -------------------------------------------------------------------


class ServerNeverStarts:
    """Stand-ins for create_app/uvicorn.Server that record whether serving was attempted."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def create_app(self, *args: Any, **kwargs: Any) -> object:
        self.calls.append("create_app")
        # serve() hands the server the service's drain, and reads afterwards whether shutdown
        # had to abandon a hung model thread.
        service = SimpleNamespace(abandoned_threads=False, drain=self.drain)
        return SimpleNamespace(state=SimpleNamespace(service=service))

    async def drain(self) -> None:
        self.calls.append("drain")

    def run(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append("server.run")

    def configure_logging(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append("configure_logging")


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> ServerNeverStarts:
    recorder = ServerNeverStarts()
    monkeypatch.setattr(service.app, "create_app", recorder.create_app)
    monkeypatch.setattr(service.logs, "configure_logging", recorder.configure_logging)
    monkeypatch.setattr(uvicorn.Server, "run", recorder.run)
    return recorder


@pytest.mark.parametrize(
    ("argv", "expected_in_stderr"),
    [
        (["--max-batch-size", "0", "--weights", "random"], "--max-batch-size: Input should be"),
        ([], "nothing to serve"),
        (["--weights", "random", "--precision", "bf16"], "bf16"),
        (["--weights", "random", "--instances-per-device", "65"], "--instances-per-device:"),
        (["--weights", "/nonexistent/ckpt.pth"], "is not a file"),
        (["--model-repository", "/nonexistent/repo"], "does not exist; run hiera-export"),
    ],
)
def test_serve_main_returns_2_on_invalid_configuration_without_serving(
    argv: list[str],
    expected_in_stderr: str,
    no_server: ServerNeverStarts,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = serve_main(argv)

    assert code == 2
    assert no_server.calls == []
    err = capsys.readouterr().err
    assert "invalid configuration" in err
    assert expected_in_stderr in err


def test_serve_main_returns_2_for_invalid_env_configuration(
    monkeypatch: pytest.MonkeyPatch, no_server: ServerNeverStarts
) -> None:
    monkeypatch.setenv("HIERA_WEIGHTS", "random")
    monkeypatch.setenv("HIERA_MAX_BATCH_SIZE", "0")

    assert serve_main([]) == 2
    assert no_server.calls == []


def test_serve_main_serves_a_valid_configuration_and_returns_0(
    monkeypatch: pytest.MonkeyPatch, no_server: ServerNeverStarts
) -> None:
    configs: list[uvicorn.Config] = []
    original_init: Callable[..., None] = uvicorn.Server.__init__

    def recording_init(self: uvicorn.Server, config: uvicorn.Config) -> None:
        configs.append(config)
        original_init(self, config)

    monkeypatch.setattr(uvicorn.Server, "__init__", recording_init)

    code = serve_main(
        ["--weights", "random", "--port", "8123", "--host", "0.0.0.0", "--drain-timeout-s", "7"]
    )

    assert code == 0
    assert no_server.calls == ["configure_logging", "create_app", "server.run"]
    (config,) = configs
    assert (config.host, config.port) == ("0.0.0.0", 8123)
    assert config.timeout_graceful_shutdown == 12


@pytest.mark.parametrize(
    ("backend", "device"), [("torchscript", "cpu"), ("eager", "auto"), ("onnx", "cuda")]
)
def test_int8_is_onnx_on_the_cpu_only(backend: str, device: str) -> None:
    with pytest.raises(ValidationError, match="precision int8 is the quantized ONNX artifact"):
        Settings(weights="random", backend=backend, device=device, precision="int8")


def test_int8_onnx_cpu_is_accepted() -> None:
    assert Settings(weights="random", backend="onnx", device="cpu", precision="int8").precision == (
        "int8"
    )


def test_cuda_graph_flags_come_in_both_polarities() -> None:
    defaults = from_cli("--weights", "random")
    assert defaults.cuda_graphs is True and defaults.onnx_cuda_graphs is False
    flipped = from_cli("--weights", "random", "--no-cuda-graphs", "--onnx-cuda-graphs")
    assert flipped.cuda_graphs is False and flipped.onnx_cuda_graphs is True


def test_device_decode_is_accepted_with_engine_processes() -> None:
    settings = Settings(weights="random", engine="process", decode_device="cuda")
    assert (settings.engine, settings.decode_device) == ("process", "cuda")
    assert settings.jpeg_slot_bytes == 4 * 2**20


@pytest.mark.parametrize(("size", "ok"), [(0, True), (4095, False), (4096, True), (1, False)])
def test_jpeg_slots_hold_at_least_a_refused_jpegs_error(size: int, ok: bool) -> None:
    if ok:
        assert Settings(weights="random", jpeg_slot_bytes=size).jpeg_slot_bytes == size
    else:
        with pytest.raises(ValidationError, match="--jpeg-slot-bytes must be 0"):
            Settings(weights="random", jpeg_slot_bytes=size)

"""gRPC against real `hiera-serve --grpc-port` processes: tritonclient.grpc, KServe's own
InferenceGRPCClient (in a child process: its protobuf modules and tritonclient's cannot
share one interpreter), the REST answers for comparison, and workers sharing the port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from bench.split import process_roles
from model.hiera import BuiltModel
from tests.service.helpers import free_port, live_server, make_image, ready_process
from tests.service.reference import probabilities, reference, top_indices

pytestmark = pytest.mark.slow
MODEL = "hiera_micro"


@pytest.fixture(scope="module")
def server(
    micro_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    log = tmp_path_factory.mktemp("grpc") / "server.log"
    port = free_port()
    args = ("--grpc-port", str(port), "--max-batch-size", "4", "--max-delay-ms", "20",
            "--no-batch-cap-from-warmup")  # fmt: skip
    with live_server(micro_repository, log, *args) as url:
        yield url, f"127.0.0.1:{port}"


@pytest.fixture
def client(server: tuple[str, str]) -> Iterator[triton_grpc.InferenceServerClient]:
    client = triton_grpc.InferenceServerClient(server[1])
    yield client
    client.close()


def _images(*images: bytes) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("image_bytes", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    return tensor


def test_tritonclient_binary_and_classification(
    client: triton_grpc.InferenceServerClient, micro_model: BuiltModel
) -> None:
    images = [make_image(11), make_image(12, fmt="PNG")]
    outputs = [
        triton_grpc.InferRequestedOutput("logits", class_count=3),
        triton_grpc.InferRequestedOutput("embedding"),
    ]
    result = client.infer(MODEL, [_images(*images)], outputs=outputs, request_id="e2e-1")
    assert result.get_response().id == "e2e-1"
    classes, embeddings = result.as_numpy("logits"), result.as_numpy("embedding")
    assert classes.shape == (2, 3) and embeddings.shape == (2, 128)
    for row, data in enumerate(images):
        logits, embedding = reference(micro_model, data)
        np.testing.assert_allclose(embeddings[row], embedding, rtol=0, atol=1e-4)
        entries = [e.decode().split(":", 2) for e in classes[row]]
        assert [int(index) for _, index, _ in entries] == top_indices(logits, 3)
        want = probabilities(logits)
        for score, index, _ in entries:
            assert float(score) == pytest.approx(float(want[int(index)]), abs=1e-5)
    # Raw logits, when no class_count is asked for.
    plain = [triton_grpc.InferRequestedOutput("logits")]
    raw = client.infer(MODEL, [_images(images[0])], outputs=plain)
    np.testing.assert_allclose(
        raw.as_numpy("logits")[0], reference(micro_model, images[0])[0], rtol=0, atol=1e-4
    )
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("resnet50", [_images(images[0])])
    assert unknown.value.status() == "StatusCode.NOT_FOUND"


def test_metadata_config_and_statistics_are_the_rest_answers(
    client: triton_grpc.InferenceServerClient, server: tuple[str, str]
) -> None:
    url = server[0]
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and not client.is_model_ready("resnet50")
    assert set(client.get_server_metadata().extensions) >= {"classification", "statistics"}
    rest = httpx.get(f"{url}/v2/models/{MODEL}", timeout=10).json()
    meta = json_format.ParseDict(rest, pb.ModelMetadataResponse())
    assert client.get_model_metadata(MODEL) == meta
    rest = httpx.get(f"{url}/v2/models/{MODEL}/config", timeout=10).json()
    config = client.get_model_config(MODEL).config
    assert config == json_format.ParseDict(rest, mc.ModelConfig())
    assert config.max_batch_size == 4 and config.dynamic_batching.max_queue_delay_microseconds
    client.infer(MODEL, [_images(make_image(13))])
    stats = client.get_inference_statistics(MODEL)
    rest = httpx.get(f"{url}/v2/models/{MODEL}/stats", timeout=10).json()
    assert stats == json_format.ParseDict(rest, pb.ModelStatisticsResponse())
    assert stats.model_stats[0].inference_stats.success.count >= 1


_KSERVE_CLIENT = textwrap.dedent(
    """
    import asyncio, base64, json, sys
    import numpy as np
    from kserve import InferenceGRPCClient, InferInput, InferRequest
    from kserve.protocol.infer_type import RequestedOutput

    async def main(target, images):
        client = InferenceGRPCClient(target, timeout=60)
        tensor = InferInput("image_bytes", [len(images)], "BYTES")
        tensor.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)
        wanted = [RequestedOutput("logits", parameters={"classification": 2}),
                  RequestedOutput("embedding")]
        request = InferRequest(model_name="hiera_micro", infer_inputs=[tensor],
                               request_id="kserve-1", request_outputs=wanted)
        response = await client.infer(request)
        out = {o.name: o.as_numpy().tolist() for o in response.outputs}
        out["logits"] = [[e.decode() for e in row] for row in out["logits"]]
        ready = await client.is_model_ready("hiera_micro")
        await client.close()
        print(json.dumps({"id": response.id, "ready": ready, **out}))

    images = [base64.b64decode(a) for a in sys.argv[2:]]
    asyncio.run(main(sys.argv[1], images))
    """
)


def test_kserve_grpc_client(server: tuple[str, str], micro_model: BuiltModel) -> None:
    import base64

    images = [make_image(14), make_image(15)]
    args = [base64.b64encode(d).decode() for d in images]
    env = os.environ | {"PYTHONPATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", _KSERVE_CLIENT, server[1], *args],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["id"] == "kserve-1" and answer["ready"] is True
    for row, data in enumerate(images):
        logits, embedding = reference(micro_model, data)
        np.testing.assert_allclose(answer["embedding"][row], embedding, rtol=0, atol=1e-4)
        indices = [int(e.split(":")[1]) for e in answer["logits"][row]]
        assert indices == top_indices(logits, 2)


def _listening(port: int, pids: list[int]) -> dict[int, int]:
    """Count, per process, the TCP sockets it holds that listen on `port` (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # LISTEN
                    inodes.add(inode)
    counts = {}
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        links = [os.readlink(fd) for fd in fds.iterdir()]
        counts[pid] = sum(link == f"socket:[{inode}]" for link in links for inode in inodes)
    return counts


@pytest.mark.parametrize("engine", ["inline", "process"])
def test_every_worker_serves_grpc_on_the_one_port(
    micro_repository: Path, tmp_path: Path, micro_model: BuiltModel, engine: str
) -> None:
    port = free_port()
    log = tmp_path / "workers.log"
    args = ("--workers", "2", "--grpc-port", str(port), "--engine", engine)
    # Ready only once both workers are: each has bound the gRPC port by then (a failed bind
    # fails the worker's startup). With --engine process they are front ends of one engine.
    with ready_process("service.cli", micro_repository, log, *args) as (_, supervisor):
        roles = process_roles(supervisor.pid)
        workers = roles["worker"]
        assert len(workers) == 2, log.read_text()
        assert len(roles["engine"]) == (1 if engine == "process" else 0)
        assert _listening(port, workers) == dict.fromkeys(workers, 1)
        data = make_image(16)
        _, embedding = reference(micro_model, data)
        for _ in range(4):  # fresh connections, spread by the kernel
            with triton_grpc.InferenceServerClient(f"127.0.0.1:{port}") as client:
                got = client.infer(MODEL, [_images(data)]).as_numpy("embedding")[0]
            np.testing.assert_allclose(got, embedding, rtol=0, atol=1e-4)

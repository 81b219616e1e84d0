"""Every example in the README and the docs runs, and prints what the page shows."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.docs.examples import MARK, ROOT, Example, documents, examples, matches
from tests.service.helpers import free_port, wait_ok

RUNNABLE = [doc for doc in documents() if any(e.fixture != "skip" for e in examples(doc))]


def test_every_example_runs_or_says_why_not() -> None:
    problems = []
    for doc in documents():
        for example in examples(doc):
            if example.mark is not None and not MARK.match(example.mark):
                problems.append(f"{example.where}: unknown marker {example.mark!r}")
            if example.fixture == "skip" and len(example.not_run_reason or "") < 10:
                problems.append(f"{example.where}: 'not run' needs a reason")
    assert not problems, "\n".join(problems)
    assert RUNNABLE, "no runnable example found"


def test_the_example_parser_pairs_examples_with_their_output(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- not run: needs a GPU -->\n```bash\nnvidia-smi\n```\n\n"
        "```bash\necho hi\n```\n\n```text\nhi\n```\n\n"
        "```python\nprint(1)\n```\nprose\n```text\n1\n```\n"
    )
    gpu, echo, python = examples(page)
    assert (gpu.fixture, gpu.not_run_reason, gpu.expected) == ("skip", "needs a GPU", None)
    assert (echo.fixture, echo.expected) == ("server", "hi\n")
    assert python.expected is None  # prose in between: an illustration, not its output
    assert matches('{"a": 1, "timing": {...}}', '{"a":1,"timing":{"decode_ms":2.1}}')
    assert not matches('{"a": 1}', '{"a": 2}')


@dataclass
class Server:
    """A running hiera-serve, and the documented addresses that stand for its ports."""

    addresses: dict[str, str]  # documented host:port -> the real one


Servers = Callable[[tuple[str, ...]], Server]
MAKE_RUN = ("--variant", "hiera_tiny_224", "--weights", "random")  # what `make run` serves


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """Start each server the examples need once (`make run`'s, or a page's own), on free ports.

    They share one export of hiera_tiny_224 (random weights, seed 0), which stands for
    `model_repository/` in their arguments.
    """
    folder = tmp_path_factory.mktemp("docs-servers")
    running: dict[tuple[str, ...], tuple[Server, subprocess.Popen[bytes]]] = {}

    def serve(args: tuple[str, ...]) -> Server:
        if args in running:
            return running[args][0]
        env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        flags = list(args)
        while flags and "=" in flags[0] and not flags[0].startswith("-"):
            name, _, value = flags.pop(0).partition("=")
            env[name] = value
        flags = [f.replace("model_repository/", f"{folder}/repository/") for f in flags]
        port, addresses = free_port(), {}
        documented = "8000"
        if "--port" in flags:
            at = flags.index("--port")
            documented = flags[at + 1]
            del flags[at : at + 2]
        for host in ("127.0.0.1", "localhost"):
            addresses[f"{host}:{documented}"] = f"127.0.0.1:{port}"
        for other in ("--metrics-port", "--grpc-port"):  # the server's other ports, moved too
            if other in flags:
                at = flags.index(other) + 1
                moved = free_port()
                for host in ("127.0.0.1", "localhost"):
                    addresses[f"{host}:{flags[at]}"] = f"127.0.0.1:{moved}"
                flags[at] = str(moved)
        if "--weights" in flags:
            flags += ["--export-dir", str(folder / "repository")]
        log = folder / f"server-{len(running)}.log"
        command = [
            str(Path(sys.executable).parent / "hiera-serve"), *flags,
            "--host", "127.0.0.1", "--port", str(port), "--log-format", "text",
        ]  # fmt: skip
        process = subprocess.Popen(
            command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env
        )
        running[args] = (Server(addresses), process)
        wait_ok(f"http://127.0.0.1:{port}/health/ready", process, log, within_s=300)
        return running[args][0]

    serve(MAKE_RUN)  # first: it writes the export the others reuse
    try:
        yield serve
    finally:
        for _, process in running.values():
            process.terminate()
        for _, process in running.values():
            process.wait(30)


def _run(
    example: Example, server: Server | None, scratch: Path
) -> subprocess.CompletedProcess[str]:
    code = example.code.replace("/tmp/", f"{scratch}/")
    for documented, real in (server.addresses if server else {}).items():
        code = code.replace(documented, real)
    command = (
        [sys.executable, "-c", code] if example.language == "python" else ["bash", "-e", "-c", code]
    )
    venv_bin = str(Path(sys.executable).parent)  # hiera-export, hiera-serve, python
    env = os.environ | {
        "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "NO_COLOR": "1",
    }
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("doc", RUNNABLE, ids=[str(d.relative_to(ROOT)) for d in RUNNABLE])
def test_examples_print_what_the_page_shows(
    doc: Path, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # One scratch folder per page stands for /tmp/: the page's examples build on each other.
    for example in examples(doc):
        if example.fixture == "skip":
            continue
        server = None
        if example.fixture == "server":
            servers: Servers = request.getfixturevalue("servers")
            server = servers(example.server_args or MAKE_RUN)
        result = _run(example, server, tmp_path)
        shown = f"{example.where} ({example.language}) exited {result.returncode}"
        assert result.returncode == 0, f"{shown}\n{result.stdout}\n{result.stderr}"
        if example.expected is None:
            continue
        output = result.stdout.replace(str(tmp_path), "/tmp")
        for documented, real in (server.addresses if server else {}).items():
            output = output.replace(real, documented)
        assert matches(example.expected, output), (
            f"{example.where}: the output differs from the page's\n--- page:\n"
            f"{example.expected}--- printed:\n{output}--- stderr:\n{result.stderr[-2000:]}"
        )

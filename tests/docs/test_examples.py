"""Every example in the README and the docs runs, and prints what the page shows."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docs.examples import ROOT, Example, documents, examples, matches
from tests.service.helpers import free_port, wait_ok

# The examples address the server `make run` starts; here it runs on a free port.
DOCUMENTED_ADDRESSES = ("127.0.0.1:8000", "localhost:8000")
RUNNABLE = [doc for doc in documents() if any(e.fixture != "skip" for e in examples(doc))]


def test_every_example_runs_or_says_why_not() -> None:
    problems = []
    for doc in documents():
        for example in examples(doc):
            if example.mark is not None and example.fixture == "server":
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


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """What `make run` serves: hiera_tiny_224, random weights (seed 0), default settings."""
    folder = tmp_path_factory.mktemp("docs-server")
    port, log = free_port(), folder / "server.log"
    command = [
        str(Path(sys.executable).parent / "hiera-serve"), "--variant", "hiera_tiny_224",
        "--weights", "random", "--export-dir", str(folder / "repository"),
        "--host", "127.0.0.1", "--port", str(port), "--log-format", "text",
    ]  # fmt: skip
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    try:
        wait_ok(f"http://127.0.0.1:{port}/health/ready", process, log, within_s=240)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)


def _run(example: Example, address: str | None, scratch: Path) -> subprocess.CompletedProcess[str]:
    code = example.code.replace("/tmp/", f"{scratch}/")
    if address is not None:
        for documented in DOCUMENTED_ADDRESSES:
            code = code.replace(documented, address)
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
        address = request.getfixturevalue("docs_server") if example.fixture == "server" else None
        result = _run(example, address, tmp_path)
        shown = f"{example.where} ({example.language}) exited {result.returncode}"
        assert result.returncode == 0, f"{shown}\n{result.stdout}\n{result.stderr}"
        if example.expected is None:
            continue
        output = result.stdout.replace(str(tmp_path), "/tmp")
        if address is not None:
            output = output.replace(address, DOCUMENTED_ADDRESSES[0])
        assert matches(example.expected, output), (
            f"{example.where}: the output differs from the page's\n--- page:\n"
            f"{example.expected}--- printed:\n{output}--- stderr:\n{result.stderr[-2000:]}"
        )

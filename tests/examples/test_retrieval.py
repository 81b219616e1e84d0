"""examples/retrieval end to end: a real server, the openai client, Qdrant in local mode."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import openai
import pytest

from tests.service.helpers import live_server

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "retrieval"
# Measured with the random-init micro model: 45/45 (see docs/api/openai.md). Near-duplicates share
# colour and layout, which even random features preserve; the bar leaves room for noise.
MIN_RECALL_AT_1 = 0.9


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"retrieval_example_{name}", EXAMPLE / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


retrieval, variants = _load("retrieval"), _load("make_variants")


@pytest.fixture(scope="module")
def server(micro_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("retrieval") / "server.log"
    with live_server(micro_repository, log, "--max-batch-size", "8") as url:
        yield url


def test_nearest_neighbour_is_a_variant_of_the_same_photo(server: str, tmp_path: Path) -> None:
    photos = variants.real_photos()
    assert len(photos) >= 9, "scikit-image (dev extra) ships the photos this test needs"
    groups = variants.write_variants(tmp_path / "photos", photos)
    paths = [p for group in groups.values() for p in group]
    assert len(paths) == 45
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    store = retrieval.connect(str(tmp_path / "qdrant"))
    try:
        count = retrieval.index_folder(
            client, store, tmp_path / "photos", collection="photos", model="hiera", batch_size=8
        )
        assert count == 45 and store.count("photos").count == 45
        # Re-indexing replaces points (ids derive from paths) instead of duplicating them.
        retrieval.index_folder(client, store, tmp_path / "photos", collection="photos",
                               model="hiera", batch_size=16)  # fmt: skip
        assert store.count("photos").count == 45
        correct = 0
        for path in paths:
            hits = retrieval.search(client, store, path, collection="photos", model="hiera",
                                    limit=2)  # fmt: skip
            # The query itself is stored: it comes first with cosine 1; the answer is next.
            assert hits[0].path == str(path) and hits[0].score == pytest.approx(1.0, abs=1e-4)
            photo = path.name.split("__")[0]
            correct += Path(hits[1].path).name.split("__")[0] == photo
    finally:
        store.close()
    recall = correct / len(paths)
    print(f"recall@1 over {len(paths)} queries: {recall:.3f}")
    assert recall >= MIN_RECALL_AT_1


def test_command_line_index_and_query(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    groups = variants.write_variants(
        tmp_path / "photos", [variants.REPO_PHOTO, *variants.real_photos()[1:3]]
    )
    common = ["--service", server, "--qdrant", str(tmp_path / "qdrant"), "--collection", "c"]
    assert retrieval.main([*common, "index", str(tmp_path / "photos")]) == 0
    assert "indexed 15 images" in capsys.readouterr().out
    query = groups["grace_hopper"][1]
    assert retrieval.main([*common, "query", str(query), "--limit", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    scores = [float(line.split()[0]) for line in lines]
    assert lines[0].endswith(str(query)) and scores == sorted(scores, reverse=True)
    assert np.isclose(scores[0], 1.0, atol=1e-3)

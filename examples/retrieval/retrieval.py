"""Image retrieval with hiera-serve embeddings and Qdrant.

    python examples/retrieval/retrieval.py index  PHOTOS_DIR   # embed every image, store it
    python examples/retrieval/retrieval.py query  PHOTO.jpg    # print the nearest images

Embeddings come from hiera-serve's OpenAI-compatible `/v1/embeddings` through the `openai`
client (unit-length vectors, so cosine similarity is what Qdrant ranks by). `--qdrant` is a
folder (Qdrant's embedded local mode, no server needed), `:memory:`, or a server URL such as
http://127.0.0.1:6333: the same code talks to all three.
"""

from __future__ import annotations

import argparse
import base64
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openai
from qdrant_client import QdrantClient
from qdrant_client.models import Distance, PointStruct, VectorParams

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
_MEDIA_TYPES = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}


@dataclass(frozen=True)
class Hit:
    path: str
    score: float


def connect(location: str) -> QdrantClient:
    """Open Qdrant: a server URL, ':memory:', or a folder for embedded local mode."""
    if location.startswith(("http://", "https://")):
        return QdrantClient(url=location)
    if location == ":memory:":
        return QdrantClient(location=":memory:")
    return QdrantClient(path=location)


def data_uri(path: Path) -> str:
    """Return the file as a data URI; the server sniffs the real format from the bytes."""
    kind = _MEDIA_TYPES.get(path.suffix.lower(), "octet-stream")
    return f"data:image/{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"


def embed(client: openai.OpenAI, paths: Sequence[Path], model: str) -> np.ndarray:
    """Return one unit-length embedding row per image, in order."""
    response = client.embeddings.create(model=model, input=[data_uri(p) for p in paths])
    return np.array([item.embedding for item in sorted(response.data, key=lambda d: d.index)])


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _batches(paths: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(paths), size):
        yield paths[start : start + size]


def _point_id(path: Path) -> str:
    # Re-indexing the same file replaces its point instead of adding a duplicate.
    return str(uuid.uuid5(uuid.NAMESPACE_URL, str(path.resolve())))


def index_folder(
    client: openai.OpenAI,
    store: QdrantClient,
    folder: Path,
    *,
    collection: str,
    model: str,
    batch_size: int = 16,
) -> int:
    """Embed every image under `folder` and upsert it with its path; return how many."""
    paths = image_files(folder)
    if not paths:
        raise SystemExit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    for batch in _batches(paths, batch_size):
        vectors = embed(client, batch, model)
        if not store.collection_exists(collection):
            store.create_collection(
                collection,
                vectors_config=VectorParams(size=vectors.shape[1], distance=Distance.COSINE),
            )
        store.upsert(
            collection,
            points=[
                PointStruct(id=_point_id(p), vector=v.tolist(), payload={"path": str(p)})
                for p, v in zip(batch, vectors, strict=True)
            ],
        )
    return len(paths)


def search(
    client: openai.OpenAI, store: QdrantClient, image: Path, *, collection: str, model: str,
    limit: int = 5,
) -> list[Hit]:  # fmt: skip
    """Return the `limit` stored images nearest to `image`, best first."""
    (vector,) = embed(client, [image], model)
    found = store.query_points(collection, query=vector.tolist(), limit=limit, with_payload=True)
    return [Hit(str((p.payload or {})["path"]), float(p.score)) for p in found.points]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `index` or `query` command."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--service", default="http://127.0.0.1:8000", help="hiera-serve URL")
    parser.add_argument("--qdrant", default="qdrant_data", help="folder, :memory: or server URL")
    parser.add_argument("--collection", default="images")
    parser.add_argument("--model", default="hiera", help="echoed by the server; any name works")
    commands = parser.add_subparsers(dest="command", required=True)
    index_cmd = commands.add_parser("index", help="embed and store every image in a folder")
    index_cmd.add_argument("folder", type=Path)
    query_cmd = commands.add_parser("query", help="print the nearest stored images")
    query_cmd.add_argument("image", type=Path)
    query_cmd.add_argument("--limit", type=int, default=5)
    args = parser.parse_args(argv)

    client = openai.OpenAI(base_url=f"{args.service.rstrip('/')}/v1", api_key="unused")
    store = connect(args.qdrant)
    try:
        if args.command == "index":
            count = index_folder(
                client, store, args.folder, collection=args.collection, model=args.model
            )
            print(f"indexed {count} images into '{args.collection}' at {args.qdrant}")
        else:
            hits = search(client, store, args.image, collection=args.collection,
                          model=args.model, limit=args.limit)  # fmt: skip
            for hit in hits:
                print(f"{hit.score:.4f}  {hit.path}")
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

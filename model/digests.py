"""File digests, with nothing heavier than hashlib: the on-disk format and the loaders share it."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, streamed so large checkpoints stay out of memory."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()

"""Provenance of a model source (file or folder) for the artifact manifest."""

from __future__ import annotations

import hashlib
import os


def source_info(path: str) -> dict:
    """Name, size and sha256 of the model file (or of every file in an HF folder)."""
    h = hashlib.sha256()
    files = ([os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path)
             else [path])
    size = 0
    for f in files:
        if not os.path.isfile(f):
            continue
        size += os.path.getsize(f)
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return {"name": os.path.basename(path.rstrip("/")), "bytes": size, "sha256": h.hexdigest()}

"""Checkpoints written atomically with a checksum, restored with ``weights_only=True``.

A checkpoint file is written under a temporary name and renamed into place; then the small
manifest ``latest.json`` (file name, SHA-256, step) is replaced the same way. A crash at any
moment leaves the previous manifest pointing at the previous, complete checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from haloseg.errors import DataError

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint"]

log = logging.getLogger(__name__)
MANIFEST = "latest.json"
KEEP = 2


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(folder: str | os.PathLike, state: dict[str, Any], step: int) -> Path:
    """Write ``state`` as ``folder/step-NNNNNNN.pt`` and point the manifest at it; keep the
    last two."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path = folder / f"step-{step:07d}.pt"
    _atomic_write(path, data)
    manifest = {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "step": step}
    _atomic_write(folder / MANIFEST, json.dumps(manifest).encode())
    for old in sorted(folder.glob("step-*.pt"))[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The checkpoint the manifest of ``folder`` names, or None when there is none yet."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        return Path(folder) / json.loads(manifest.read_text())["file"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"checkpoint manifest {manifest} is unreadable ({e})") from None


def load_checkpoint(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The latest checkpoint of ``folder`` after checking its SHA-256, or None."""
    manifest_path = Path(folder) / MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        path = Path(folder) / manifest["file"]
        data, digest = path.read_bytes(), manifest["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"checkpoint manifest {manifest_path} is unreadable ({e})") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise DataError(
            f"checkpoint {path} does not match its SHA-256 in {manifest_path}; the file is "
            "corrupt: restore it or delete the manifest to start over"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, EOFError) as e:
        raise DataError(f"checkpoint {path} cannot be loaded ({e})") from None
    log.info("restored %s (step %d)", path, manifest["step"])
    return state

"""Writing run artefacts so that a crash or a full disk never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one step: the old file stays intact until the new one is
    complete on disk (temporary file in the same directory, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # Like open(path, "wb"), honouring the umask, but never following or reusing a file.
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: object) -> None:
    """Pretty-printed JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())

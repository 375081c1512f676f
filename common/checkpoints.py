"""Checks both frameworks apply to a checkpoint: its kind, and the SHA-256 of its contents.

Each framework writes its own format (torch.save, msgpack) with its own safe loader; the
digest is computed here, over the loaded contents rather than the file's bytes, so that one
definition serves both: every key, number, string and array (dtype, shape and bytes) of the
checkpoint, with the metadata minus the digest itself. A flipped byte that the loader does not
notice (a momentum value that became 4e37) then fails the check instead of training on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import CheckpointError

# Format 1 (before digests) is still read, without a digest to check.
CHECKPOINT_FORMAT = 2
DIGEST_KEY = "sha256"


def unreadable(path: Path, title: str, error: Exception) -> CheckpointError:
    """The error for a file the framework's loader rejected (truncated, corrupt or foreign)."""
    return CheckpointError(
        f"{path} cannot be read as a {title} checkpoint ({type(error).__name__}: {error}). It may be "
        "truncated or not a file of this project; it was not modified."
    )


def contents_digest(meta: dict, contents: dict, to_array: Callable[[Any], Any] = lambda leaf: leaf) -> str:
    """SHA-256 of `meta` and `contents` (the checkpoint's other entries); `to_array` turns a
    framework's tensors into NumPy arrays."""
    digest = hashlib.sha256()

    def visit(value: Any) -> None:
        value = to_array(value)
        if isinstance(value, dict):
            digest.update(b"{")
            for key in sorted(value, key=str):
                digest.update(str(key).encode() + b":")
                visit(value[key])
            digest.update(b"}")
        elif isinstance(value, list | tuple):
            digest.update(b"[")
            for item in value:
                visit(item)
            digest.update(b"]")
        elif isinstance(value, str | bytes):
            digest.update(b"s" + (value.encode() if isinstance(value, str) else value) + b"\0")
        elif value is None:
            digest.update(b"n")
        else:
            array = np.ascontiguousarray(value)
            digest.update(f"a{array.dtype.str}{array.shape}".encode() + array.tobytes())

    # The metadata as canonical JSON text, which is what survives the round trip through the file.
    visit({"meta": json.dumps({k: v for k, v in meta.items() if k != DIGEST_KEY}, sort_keys=True), **contents})
    return digest.hexdigest()


def sealed_meta(meta: dict, contents: dict, to_array: Callable[[Any], Any] = lambda leaf: leaf) -> str:
    """`meta` as the JSON a checkpoint stores, with the digest of everything it holds."""
    meta = {**meta, "format": CHECKPOINT_FORMAT}
    return json.dumps({**meta, DIGEST_KEY: contents_digest(meta, contents, to_array)}, allow_nan=False)


def checkpoint_meta(payload: object, path: Path, framework: str, package: str, keys: set[str],
                    to_array: Callable[[Any], Any] = lambda leaf: leaf) -> dict:
    """The run metadata of a training checkpoint, after checking that it is one of
    `framework`'s and that its contents are those it was saved with."""
    if not isinstance(payload, dict) or not keys <= set(payload):
        raise CheckpointError(f"{path} is not a {package} training checkpoint (expected keys {sorted(keys)}); "
                              "it was not modified.")
    try:
        meta = json.loads(payload["meta"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its metadata is damaged ({error}); it was not modified. Resume from "
                              "another copy, or start a new run.") from error
    if meta.get("framework") != framework:
        raise CheckpointError(f"{path} was written by {meta.get('framework')!r}, not by {package}.")
    if meta.get("format", 1) >= 2:
        contents = {key: value for key, value in payload.items() if key != "meta"}
        if meta.get(DIGEST_KEY) != contents_digest(meta, contents, to_array):
            raise CheckpointError(
                f"{path}: its contents do not match the SHA-256 recorded when it was saved, so the file was "
                "damaged after it was written (disk, copy or edit); it was not modified. Resume from another "
                "copy, or start a new run."
            )
    return meta

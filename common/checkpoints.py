"""Checks both frameworks apply to a checkpoint file after their own safe loader has read it."""

from __future__ import annotations

import json
from pathlib import Path

from common.errors import CheckpointError


def unreadable(path: Path, title: str, error: Exception) -> CheckpointError:
    """The error for a file the framework's loader rejected (truncated, corrupt or foreign)."""
    return CheckpointError(
        f"{path} cannot be read as a {title} checkpoint ({type(error).__name__}: {error}). It may be "
        "truncated or not a file of this project; it was not modified."
    )


def checkpoint_meta(payload: object, path: Path, framework: str, package: str, keys: set[str]) -> dict:
    """The run metadata of a training checkpoint, after checking it is one of `framework`'s."""
    if not isinstance(payload, dict) or not keys <= set(payload):
        raise CheckpointError(f"{path} is not a {package} training checkpoint (expected keys {sorted(keys)}); "
                              "it was not modified.")
    meta = json.loads(payload["meta"])
    if meta.get("framework") != framework:
        raise CheckpointError(f"{path} was written by {meta.get('framework')!r}, not by {package}.")
    return meta

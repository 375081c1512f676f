"""Helpers that write small synthetic IDX files for the reader's tests."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from common.idx import idx_magic


def encode_idx(array: np.ndarray, magic: int | None = None) -> bytes:
    """The IDX bytes of a uint8 array (optionally with a wrong magic number)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = (idx_magic(array.ndim) if magic is None else magic).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    payload = encode_idx(array, magic)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path

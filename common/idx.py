"""Parse the IDX format of the MNIST files, refusing anything that is not exactly what it claims.

The format: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions,
then one big-endian uint32 per dimension, then the data. Every check names the file, because
the usual cause is a truncated download or a file renamed into the wrong slot.
"""

from __future__ import annotations

import numpy as np

from common.errors import DataError

_UINT8_TYPE_CODE = 0x08


def idx_magic(ndim: int) -> int:
    """The magic number of an unsigned-byte IDX file with `ndim` dimensions (0x801, 0x803)."""
    return (_UINT8_TYPE_CODE << 8) | ndim


def parse_idx(payload: bytes, expected_shape: tuple[int | None, ...], source: str) -> np.ndarray:
    """Return the uint8 array stored in `payload`, checking magic number, dimensions and size.
    A dimension given as None in `expected_shape` may have any size."""
    ndim = len(expected_shape)
    header_size = 4 + 4 * ndim
    if len(payload) < header_size:
        raise DataError(
            f"{source}: only {len(payload)} bytes, shorter than the {header_size}-byte IDX header. "
            "The file is truncated; delete it and download it again."
        )
    magic = int.from_bytes(payload[:4], "big")
    if magic != idx_magic(ndim):
        raise DataError(
            f"{source}: IDX magic number is 0x{magic:08x}, expected 0x{idx_magic(ndim):08x} "
            f"(unsigned bytes, {ndim} dimension(s)). This is not the MNIST file of that name."
        )
    shape = tuple(
        int.from_bytes(payload[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    if any(expected is not None and expected != size for expected, size in zip(expected_shape, shape, strict=True)):
        raise DataError(
            f"{source}: IDX header gives dimensions {shape}, expected "
            f"{tuple('any' if d is None else d for d in expected_shape)}."
        )
    expected_size = header_size + int(np.prod(shape))
    if len(payload) != expected_size:
        raise DataError(
            f"{source}: {len(payload)} bytes, expected {expected_size} for dimensions {shape}. "
            "The file is truncated or has trailing data; delete it and download it again."
        )
    return np.frombuffer(payload, dtype=np.uint8, offset=header_size).reshape(shape)


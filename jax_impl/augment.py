"""The core's train augmentation, on the device, for epochs that run as one compiled program.

Mirrors `common.transforms.resize_crop`, `rotate` and `normalize` with the same integer tables
and the same sampling coordinates (computed by the core, in float64, on the host), so it
produces bit-identical pixels: only integer gathers, products, sums and shifts happen here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from common.transforms import NORMALIZE_TABLE, PIXELS, WEIGHT_BITS, crop_resize_taps


def resize_crop(images: jax.Array, crop_size: int) -> jax.Array:
    """CenterCrop + bilinear resize of uint8 images (N, 28, 28), as the core computes it."""
    index, weight = crop_resize_taps(crop_size)
    count, height, width = images.shape
    gathered = images.reshape(count, PIXELS)[:, index].astype(jnp.int32)
    total = (gathered * jnp.asarray(weight)).sum(-1)
    rounded = (total + (1 << (WEIGHT_BITS - 1))) >> WEIGHT_BITS
    return rounded.astype(jnp.uint8).reshape(count, height, width)


def rotate(images: jax.Array, source_index: jax.Array) -> jax.Array:
    """Gather every output pixel from the core's sampling coordinates (PIXELS = the fill)."""
    count, height, width = images.shape
    padded = jnp.concatenate([images.reshape(count, PIXELS), jnp.zeros((count, 1), images.dtype)], axis=1)
    return jnp.take_along_axis(padded, source_index.astype(jnp.int32), axis=1).reshape(count, height, width)


def augment(images: jax.Array, crop: jax.Array, source_index: jax.Array, crop_size: int) -> jax.Array:
    """The seed's train augmentation for the given draws; uint8 in and out."""
    cropped = jnp.where(crop[:, None, None], resize_crop(images, crop_size), images)
    return rotate(cropped, source_index)


def normalize(pixels: jax.Array) -> jax.Array:
    """uint8 -> float32 through the core's table (ToTensor + Normalize)."""
    return jnp.asarray(NORMALIZE_TABLE)[pixels]

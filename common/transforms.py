"""The seed's image transforms, written once for both frameworks and vectorised over a batch.

Train: with probability p CenterCrop(22) and a bilinear resize back to 28x28; a rotation drawn
uniformly from [-15, 15] degrees, nearest neighbour, fill 0; then ToTensor + Normalize.
Test: ToTensor + Normalize.

Augmentation is a pure function of (images, draws), built so that it is exact on any device:
1. `draw_augmentation` draws a crop flag, an angle, a shift and a zoom per image (the only
   randomness);
2. `rotation_source_index` turns each angle, zoom and shift into the sampling coordinates of the
   warp: for every output pixel, the flat index of the pixel it copies (`FILL_INDEX` for
   the fill). This is the only floating-point step, and it always runs here, in float64;
3. `resize_crop` (fixed-point bilinear weights, int32 sums, rounded back to uint8 as PIL does
   for uint8 images) and `rotate` (a gather) use integers only, so a device-side copy of them
   gives bit-identical pixels from the same coordinates;
4. `normalize` maps uint8 to float32 through one 256-entry table, identical everywhere.
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple

import numpy as np

from common.recipes import Augmentation
from common.spec import IMAGE_SIZE, NORMALIZE_MEAN, NORMALIZE_STD

PIXELS = IMAGE_SIZE * IMAGE_SIZE
FILL_INDEX = PIXELS  # rotation coordinate of pixels that fall outside: a zero appended to each image
WEIGHT_BITS = 14  # bilinear weights are integers summing to 2**14; 255 * 2**14 fits in int32

# ToTensor (x / 255) followed by Normalize(mean, std), for every possible uint8 value.
NORMALIZE_TABLE = ((np.arange(256) / 255.0 - NORMALIZE_MEAN) / NORMALIZE_STD).astype(np.float32)


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 model inputs (ToTensor + Normalize)."""
    return NORMALIZE_TABLE[images]


class Draws(NamedTuple):
    """An epoch's augmentation draws, one per image."""

    crop: np.ndarray  # (N,) bool: crop and resize
    angles: np.ndarray  # (N,) float64 degrees
    shifts: np.ndarray  # (N, 2) int64 pixels, across and down
    scales: np.ndarray  # (N,) float64 zoom factors


def draw_augmentation(rng: np.random.Generator, count: int, augmentation: Augmentation) -> Draws:
    """Per image: whether to crop-and-resize, the rotation angle, the shift and the zoom.

    Shifts and zooms are drawn last, each only when the recipe uses it, so recipes without them
    consume the generator exactly as the seed's transforms always have."""
    crop = rng.random(count) < augmentation.crop_prob
    angles = rng.uniform(-augmentation.max_rotation, augmentation.max_rotation, count)
    limit = augmentation.max_translation
    shifts = rng.integers(-limit, limit, (count, 2), endpoint=True) if limit else np.zeros((count, 2), np.int64)
    zoom = augmentation.max_scale
    scales = rng.uniform(1 - zoom, 1 + zoom, count) if zoom else np.ones(count)
    return Draws(crop, angles, shifts, scales)


def rotation_source_index(angles: np.ndarray, shifts: np.ndarray | None = None,
                          scales: np.ndarray | None = None) -> np.ndarray:
    """Sampling coordinates (N, 784) int32 of a nearest-neighbour rotation by `angles` degrees
    (counter-clockwise) and zoom by `scales` about the image centre, followed by a shift of
    `shifts` (N, 2) pixels (across, down); no shift or zoom if omitted: the flat source index of
    each output pixel, or FILL_INDEX outside.

    Follows PIL's `Image.rotate(angle, NEAREST)`, which torchvision's RandomRotation calls, and
    the affine transform torchvision's RandomAffine hands PIL: the output pixel centre
    (x + 0.5, y + 0.5), moved back by the shift, is rotated back and divided by the zoom about
    the image centre (14, 14), and the source pixel is its floor.
    """
    theta = np.deg2rad(np.asarray(angles, dtype=np.float64))[:, None]
    centre = IMAGE_SIZE / 2
    grid = np.arange(IMAGE_SIZE) + 0.5 - centre
    dx = np.tile(grid, IMAGE_SIZE)[None, :]
    dy = np.repeat(grid, IMAGE_SIZE)[None, :]
    if shifts is not None:
        dx = dx - shifts[:, :1]
        dy = dy - shifts[:, 1:]
    zoom = 1.0 if scales is None else np.asarray(scales, dtype=np.float64)[:, None]
    cos, sin = np.cos(theta) / zoom, np.sin(theta) / zoom
    src_x = np.floor(cos * dx - sin * dy + centre)
    src_y = np.floor(sin * dx + cos * dy + centre)
    inside = (src_x >= 0) & (src_x < IMAGE_SIZE) & (src_y >= 0) & (src_y < IMAGE_SIZE)
    return np.where(inside, src_y * IMAGE_SIZE + src_x, FILL_INDEX).astype(np.int32)


@cache
def crop_resize_taps(crop_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed bilinear taps of CenterCrop(crop_size) + resize to 28x28: for each output pixel
    4 flat source indices and 4 integer weights summing to 2**WEIGHT_BITS, shapes (784, 4).

    Follows PIL's bilinear upscale: the source coordinate of output pixel i is
    (i + 0.5) * crop_size / 28 - 0.5 inside the crop, clamped to the crop's edge pixels.
    """
    offset = int(round((IMAGE_SIZE - crop_size) / 2))  # torchvision's CenterCrop placement
    coordinate = (np.arange(IMAGE_SIZE) + 0.5) * crop_size / IMAGE_SIZE - 0.5
    coordinate = np.clip(coordinate, 0, crop_size - 1)
    low = np.floor(coordinate).astype(np.int64)
    high = np.minimum(low + 1, crop_size - 1)
    frac = coordinate - low
    axis_taps = [(low, 1 - frac), (high, frac)]
    indices, weights = [], []
    for rows, row_weight in axis_taps:
        for cols, col_weight in axis_taps:
            indices.append((rows[:, None] + offset) * IMAGE_SIZE + (cols[None, :] + offset))
            weights.append(row_weight[:, None] * col_weight[None, :])
    index = np.stack(indices, -1).reshape(PIXELS, 4).astype(np.int32)
    weight = _to_fixed_point(np.stack(weights, -1).reshape(PIXELS, 4))
    index.setflags(write=False)
    weight.setflags(write=False)
    return index, weight


def _to_fixed_point(weights: np.ndarray) -> np.ndarray:
    """Round float weights to int32 that sum to exactly 2**WEIGHT_BITS per pixel."""
    scaled = np.rint(weights * (1 << WEIGHT_BITS)).astype(np.int64)
    largest = np.argmax(scaled, axis=-1)
    scaled[np.arange(len(scaled)), largest] += (1 << WEIGHT_BITS) - scaled.sum(-1)
    return scaled.astype(np.int32)


def resize_crop(images: np.ndarray, crop_size: int) -> np.ndarray:
    """CenterCrop(crop_size) then bilinear resize back to 28x28, uint8 in and out."""
    index, weight = crop_resize_taps(crop_size)
    count = len(images)
    gathered = images.reshape(count, PIXELS)[:, index].astype(np.int32)
    total = (gathered * weight).sum(-1)
    rounded = (total + (1 << (WEIGHT_BITS - 1))) >> WEIGHT_BITS
    return rounded.astype(np.uint8).reshape(count, IMAGE_SIZE, IMAGE_SIZE)


def rotate(images: np.ndarray, source_index: np.ndarray) -> np.ndarray:
    """Gather each output pixel from `source_index` (see rotation_source_index), uint8 in and out."""
    count = len(images)
    padded = np.zeros((count, PIXELS + 1), np.uint8)  # the extra zero is the fill
    padded[:, :PIXELS] = images.reshape(count, PIXELS)
    offsets = np.arange(count, dtype=np.int64)[:, None] * (PIXELS + 1)
    return padded.reshape(-1)[source_index + offsets].reshape(count, IMAGE_SIZE, IMAGE_SIZE)


def augment(
    images: np.ndarray, crop: np.ndarray, source_index: np.ndarray, crop_size: int
) -> np.ndarray:
    """The seed's train augmentation of uint8 images (N, 28, 28) for the given draws."""
    cropped = images.copy()
    if crop.any():
        cropped[crop] = resize_crop(images[crop], crop_size)
    return rotate(cropped, source_index)

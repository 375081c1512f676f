"""Seeded per-epoch shuffling and batching, shared so that both frameworks see the same batches.

All randomness of an epoch comes from one NumPy generator keyed by (seed, epoch): the
permutation first, then the augmentation draws for every position of that permutation. A run
resumed at epoch k therefore sees exactly the batches an uninterrupted run would have, and a
PyTorch and a JAX run with the same seed consume identical pixels in identical order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from common.errors import UserFacingError
from common.recipes import Augmentation
from common.transforms import augment, draw_augmentation, normalize, rotation_source_index


class Batch(NamedTuple):
    """Model inputs (B, 28, 28) float32, normalised, and labels (B,) int64."""

    images: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class EpochPlan:
    """One epoch of training: which examples in which order, and their augmentation draws."""

    order: np.ndarray  # (N,) dataset indices, in the order they are consumed
    crop: np.ndarray  # (N,) bool, crop-and-resize draw of each position
    angles: np.ndarray  # (N,) float64 degrees, rotation draw of each position
    shifts: np.ndarray  # (N, 2) int64 pixels (across, down), translation draw of each position
    scales: np.ndarray  # (N,) float64, zoom draw of each position
    batch_size: int
    crop_size: int

    def batch_slices(self) -> list[slice]:
        """Consecutive slices of `batch_size`; the last one is shorter (no example is dropped)."""
        count = len(self.order)
        return [slice(s, min(s + self.batch_size, count)) for s in range(0, count, self.batch_size)]

    def head(self, count: int) -> EpochPlan:
        """The first `count` positions only (for --dry-run)."""
        return self._at(slice(count), self.batch_size)

    def shard(self, index: int, count: int) -> EpochPlan:
        """Part `index` of `count` of every batch: each batch is cut into `count` equal consecutive
        parts, as data-parallel training splits the global batch over its devices or processes.
        The result is itself a plan whose batches are those parts (see `check_even_shards`)."""
        check_even_shards(self.batch_size, len(self.order), count)
        positions = np.concatenate([np.arange(part.start + index * size, part.start + (index + 1) * size)
                                    for part in self.batch_slices()
                                    for size in [(part.stop - part.start) // count]])
        return self._at(positions, self.batch_size // count)

    def _at(self, positions: slice | np.ndarray, batch_size: int) -> EpochPlan:
        return EpochPlan(self.order[positions], self.crop[positions], self.angles[positions], self.shifts[positions],
                         self.scales[positions], batch_size, self.crop_size)

    def source_index(self, positions: slice = slice(None)) -> np.ndarray:
        """Sampling coordinates of the rotation, zoom and shift at `positions` (see rotation_source_index)."""
        return rotation_source_index(self.angles[positions], self.shifts[positions], self.scales[positions])

    def augmented_pixels(self, images: np.ndarray, positions: slice) -> np.ndarray:
        """The augmented uint8 images at `positions` of this epoch's order."""
        return augment(images[self.order[positions]], self.crop[positions], self.source_index(positions),
                       self.crop_size)

    def batch(self, images: np.ndarray, labels: np.ndarray, positions: slice) -> Batch:
        """The augmented, normalised training batch at `positions` of this epoch's order."""
        return Batch(normalize(self.augmented_pixels(images, positions)),
                     labels[self.order[positions]].astype(np.int64))


def plan_epoch(
    seed: int, epoch: int, num_examples: int, batch_size: int, augmentation: Augmentation
) -> EpochPlan:
    """The shuffle and augmentation draws of `epoch` (1-based) for `seed`."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_examples)
    return EpochPlan(order, *draw_augmentation(rng, num_examples, augmentation), batch_size, augmentation.crop_size)


def check_even_shards(batch_size: int, epoch_images: int | None, devices: int) -> None:
    """Every batch must split evenly over the devices: each device's mean loss then weighs its
    images as the global batch's mean does, and no device waits on a smaller part. Without
    `epoch_images` (before the data is loaded) only the batch size is checked."""
    last = epoch_images % batch_size if epoch_images else 0
    uneven = ([f"batch size {batch_size}"] if batch_size % devices else []) + (
        [f"the epoch's last batch of {last} images"] if last % devices else [])
    if uneven:
        divides = f"both the batch and the {epoch_images:,} training images' last batch" if epoch_images else \
            "the batch"
        raise UserFacingError(
            f"--devices {devices}: every batch is split evenly over the devices, but {' and '.join(uneven)} "
            f"cannot be cut into {devices} equal parts. Choose a --batch-size (or number of devices) that "
            f"divides {divides}.")


def train_batches(plan: EpochPlan, images: np.ndarray, labels: np.ndarray) -> Iterator[Batch]:
    """Augmented, normalised training batches of one epoch, in the plan's order."""
    for positions in plan.batch_slices():
        yield plan.batch(images, labels, positions)


class CopiedOnce:
    """`copy(images, labels)` (the training set onto a device) done once, and reused while the
    same host arrays come back, so that a device-resident epoch copies nothing per epoch."""

    def __init__(self, copy: Callable[[np.ndarray, np.ndarray], Any]):
        self._copy = copy
        self._copied: tuple[np.ndarray, Any] | None = None

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> Any:
        if self._copied is None or self._copied[0] is not images:
            self._copied = (images, self._copy(images, labels))
        return self._copied[1]

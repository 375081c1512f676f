"""A small synthetic MNIST, written as the four IDX files, so that a bare clone can run every
test that needs data only in order to have data.

Each image is a seven-segment digit drawn with anti-aliased strokes of uneven intensity at a
random position, size, slant and stroke width: deterministic for a given seed, in MNIST's
format (28x28 uint8, a white digit on a background of exact zeros), different enough between classes that the model
learns it within a few dozen steps, and varied enough within a class that it cannot be
memorised from one example. The files are read by the project's own reader; only the
checksum check and the official image counts are switched off for their directory
(common.mnist.UNVERIFIED_TEST_DIR_ENV).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from common.mnist import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, Mnist
from tests.idx_files import write_idx

TRAIN_COUNT = 640  # ten batches of 64, two and a half of 256
TEST_COUNT = 160

# Segment endpoints in a unit box (x right, y down): a top, b top right, c bottom right,
# d bottom, e bottom left, f top left, g middle.
SEGMENTS = {
    "a": ((0, 0), (1, 0)), "b": ((1, 0), (1, 0.5)), "c": ((1, 0.5), (1, 1)), "d": ((0, 1), (1, 1)),
    "e": ((0, 0.5), (0, 1)), "f": ((0, 0), (0, 0.5)), "g": ((0, 0.5), (1, 0.5)),
}
DIGITS = ("abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg")


def _distance_to_segment(x: np.ndarray, y: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance of each pixel centre (x, y) to the segment start-end (arrays of 2)."""
    direction = end - start
    length_squared = max(float(direction @ direction), 1e-12)
    t = np.clip(((x - start[0]) * direction[0] + (y - start[1]) * direction[1]) / length_squared, 0, 1)
    return np.hypot(x - (start[0] + t * direction[0]), y - (start[1] + t * direction[1]))


def draw_digit(label: int, rng: np.random.Generator) -> np.ndarray:
    """One 28x28 uint8 image of `label`."""
    width, height = rng.uniform(7, 11), rng.uniform(13, 17)
    left = 14 - width / 2 + rng.uniform(-3, 3)
    top = 14 - height / 2 + rng.uniform(-3, 3)
    slant = rng.uniform(-0.25, 0.25)  # shear: x moves by slant * (distance above the centre)
    stroke = rng.uniform(1.0, 1.8)
    y, x = np.mgrid[0:28, 0:28] + 0.5
    distance = np.full((28, 28), np.inf)
    for name in DIGITS[label]:
        ends = []
        for u, v in SEGMENTS[name]:
            ends.append(np.array([left + u * width + slant * (0.5 - v) * height, top + v * height]))
        distance = np.minimum(distance, _distance_to_segment(x, y, *ends))
    ink = np.clip(stroke + 0.5 - distance, 0, 1)  # one pixel of anti-aliased edge
    grain = rng.uniform(0.85, 1.0, (28, 28))  # uneven ink; the background stays exactly 0, as in MNIST
    return np.round(255 * ink * grain * rng.uniform(0.85, 1.0)).astype(np.uint8)


def make_split(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` images with balanced labels in a random order."""
    labels = rng.permutation(np.arange(count) % 10).astype(np.uint8)
    return np.stack([draw_digit(int(label), rng) for label in labels]), labels


def write_synthetic_mnist(directory: Path, seed: int = 0) -> Path:
    """Write the four gzipped IDX files under their official names into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train_images, train_labels = make_split(TRAIN_COUNT, rng)
    test_images, test_labels = make_split(TEST_COUNT, rng)
    for spec, array in ((TRAIN_IMAGES, train_images), (TRAIN_LABELS, train_labels),
                        (TEST_IMAGES, test_images), (TEST_LABELS, test_labels)):
        write_idx(directory / f"{spec.name}.gz", array)
    return directory


def write_synthetic_tfds(data: Mnist, data_dir: Path) -> Path:
    """`data` as tfds's prepared MNIST in the tfds data directory `data_dir` (`data_dir/mnist/<version>`),
    with the features and version of tfds's own MNIST builder, which reads it back as it reads
    the real one. tfds's builder itself prepares only the official files (it checks their
    checksums and counts), hence this writer. tfds shuffles the examples as it stores them."""
    import tensorflow_datasets as tfds

    reference = tfds.builder("mnist", data_dir=data_dir)
    splits = {name: [(index, {"image": image[..., None], "label": int(label)})
                     for index, (image, label) in enumerate(zip(images, labels, strict=True))]
              for name, images, labels in (("train", data.train_images, data.train_labels),
                                           ("test", data.test_images, data.test_labels))}
    tfds.dataset_builders.store_as_tfds_dataset(name="mnist", version=str(reference.info.version),
                                                features=reference.info.features, split_datasets=splits,
                                                data_dir=data_dir)
    shutil.rmtree(data_dir / "downloads", ignore_errors=True)  # tfds's empty scratch folder
    return data_dir

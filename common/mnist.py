"""Find, verify, download and read the four MNIST files.

Accepted layouts of a data directory (first match wins, uncompressed before gzipped):
`<dir>/<name>`, `<dir>/<name>.gz`, and torchvision's `<dir>/MNIST/raw/<name>[.gz]`, so an
existing torchvision download can be reused as it is. Every file is checked against the
official SHA-256 before use; a bad file is reported, never overwritten or deleted.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from common.download import DownloadFailed, download_verified
from common.errors import DataError
from common.idx import parse_idx

DATA_DIR_ENV = "MNIST_DATA_DIR"
# Test-only, the one way to read files that are not the official ones: tests/synthetic_mnist.py
# writes a small synthetic MNIST (valid IDX files, a few hundred images), which can match neither
# the official checksums nor the official image counts. The directory named here, and no other,
# is read without the checksum check, with any number of images, and never downloaded into.
# Nothing but the test suite sets it.
UNVERIFIED_TEST_DIR_ENV = "MNIST_UNVERIFIED_TEST_DIR"
DEFAULT_DATA_DIR = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "era-s6-mnist"

# Public mirrors of the original files, in the order torchvision and TensorFlow use them.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)


@dataclass(frozen=True)
class MnistFile:
    """One of the four official files: its name, array shape and SHA-256 in both forms."""

    name: str
    shape: tuple[int, ...]
    gz_sha256: str
    raw_sha256: str


TRAIN_IMAGES = MnistFile(
    "train-images-idx3-ubyte", (60000, 28, 28),
    "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
)
TRAIN_LABELS = MnistFile(
    "train-labels-idx1-ubyte", (60000,),
    "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
)
TEST_IMAGES = MnistFile(
    "t10k-images-idx3-ubyte", (10000, 28, 28),
    "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
)
TEST_LABELS = MnistFile(
    "t10k-labels-idx1-ubyte", (10000,),
    "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
)
MNIST_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)


class Mnist(NamedTuple):
    """The dataset as uint8 arrays: images (N, 28, 28), labels (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


# The last twelfth of the training images: 5,000 of MNIST's 60,000.
VALIDATION_FRACTION = 1 / 12


def validation_split(data: Mnist, fraction: float = VALIDATION_FRACTION) -> Mnist:
    """The training images but the last `fraction` to train on, and that last part as the
    evaluation set in place of the test set (MNIST: 55,000 and 5,000): recipes are chosen on
    this split, never on the test images."""
    size = round(len(data.train_labels) * fraction)
    return Mnist(data.train_images[:-size], data.train_labels[:-size],
                 data.train_images[-size:], data.train_labels[-size:])


def resolve_data_dir(flag_value: str | os.PathLike | None) -> Path:
    """`--data-dir` if given, else $MNIST_DATA_DIR, else the per-user cache directory."""
    chosen = flag_value or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(chosen).expanduser()


def find_file(root: Path, spec: MnistFile) -> Path | None:
    """The first existing copy of `spec` under `root`, in any accepted layout."""
    for folder in (root, root / "MNIST" / "raw"):
        for name in (spec.name, spec.name + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def is_unverified_test_dir(root: Path) -> bool:
    """Whether `root` is the test suite's synthetic MNIST (see UNVERIFIED_TEST_DIR_ENV)."""
    chosen = os.environ.get(UNVERIFIED_TEST_DIR_ENV)
    return bool(chosen) and Path(chosen).resolve() == root.resolve()


def read_mnist_file(path: Path, spec: MnistFile, verify: bool = True) -> np.ndarray:
    """Decode and check one file: structure first (it explains truncation best), then checksum.
    With `verify` off (the synthetic test data only), any image count passes and the checksum
    is not compared."""
    payload = path.read_bytes()
    compressed = path.suffix == ".gz"
    expected = spec.gz_sha256 if compressed else spec.raw_sha256
    actual = hashlib.sha256(payload).hexdigest()
    if compressed:
        try:
            payload = gzip.decompress(payload)
        except (EOFError, OSError, zlib.error) as error:
            raise DataError(
                f"{path}: not a complete gzip file ({error}); SHA-256 {actual}, expected {expected}. "
                "Delete it to download it again, or point --data-dir / $MNIST_DATA_DIR at a good copy."
            ) from error
    array = parse_idx(payload, spec.shape if verify else (None, *spec.shape[1:]), str(path))
    if verify and actual != expected:
        raise DataError(
            f"{path}: SHA-256 {actual}, expected {expected} (the official {spec.name}"
            f"{'.gz' if compressed else ''}). The file is corrupt or not the official MNIST file; "
            "it was left untouched. Delete it to download it again, or point --data-dir / "
            "$MNIST_DATA_DIR at a good copy."
        )
    return array


def load_mnist(data_dir: str | os.PathLike | None = None, download: bool = True) -> Mnist:
    """Read (downloading what is missing, if allowed) and verify the four MNIST files."""
    root = resolve_data_dir(data_dir)
    if root.exists() and not root.is_dir():
        raise DataError(f"--data-dir / ${DATA_DIR_ENV} {root} is a file; point it at a directory (holding the "
                        "MNIST files, or where they may be downloaded).")
    verify = not is_unverified_test_dir(root)
    arrays = []
    for spec in MNIST_FILES:
        path = find_file(root, spec)
        if path is None:
            if not download or not verify:
                raise DataError(_missing_message(root, spec, "downloading is disabled"))
            _check_writable(root, spec)
            path = root / (spec.name + ".gz")
            try:
                download_verified([m + spec.name + ".gz" for m in MIRRORS], path, spec.gz_sha256)
            except DownloadFailed as failure:
                reason = "no MNIST mirror could be reached (offline?)" if failure.offline else str(failure)
                raise DataError(_missing_message(root, spec, reason)) from failure
        arrays.append(read_mnist_file(path, spec, verify))
    data = Mnist(*arrays)
    if len(data.train_images) != len(data.train_labels) or len(data.test_images) != len(data.test_labels):
        raise DataError(f"{root}: the image and label files hold different numbers of examples.")
    return data


def _check_writable(root: Path, spec: MnistFile) -> None:
    """Refuse early, and say why, when a missing file could not be saved after its download."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as error:
        raise DataError(
            f"MNIST file {spec.name}[.gz] is not in {root}, and it cannot be downloaded there: the directory "
            f"cannot be written ({error.strerror or error}). Put the four official MNIST files in it yourself, or "
            f"pass a writable directory (or one holding the files) with --data-dir DIR or {DATA_DIR_ENV}=DIR."
        ) from error


def _missing_message(root: Path, spec: MnistFile, reason: str) -> str:
    return (
        f"MNIST file {spec.name}[.gz] is not in {root} and could not be downloaded: {reason}. "
        "Put the four official MNIST files (gzipped or not, or torchvision's MNIST/raw folder) in a "
        f"directory and pass it with --data-dir DIR or set {DATA_DIR_ENV}=DIR."
    )

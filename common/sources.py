"""Where the MNIST examples come from: this project's IDX reader, tensorflow-datasets or torchvision.

JAX users usually hold MNIST as a tfds dataset, PyTorch users as a torchvision download; either
trainer can read either, and both give the very examples of the official files. The IDX reader
checks the files' SHA-256 (common.mnist); the other two are checked here, after loading, against
the official examples as multisets (`examples_digest`), since tfds stores MNIST in an order of
its own. torchvision keeps the files' order. Within one source both frameworks see identical
batches for a seed; across sources the examples are shuffled differently, so runs differ.

tensorflow-datasets and torchvision are optional extras, imported only when their source is
chosen; a missing or broken one stops the run with the cause and the install command.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import numpy as np

from common.errors import DataError
from common.mnist import MNIST_FILES, Mnist, is_unverified_test_dir, load_mnist, resolve_data_dir

SOURCES = ("idx", "tfds", "torchvision")
DEFAULT_SOURCE = "idx"
TFDS_DATA_DIR_ENV = "TFDS_DATA_DIR"
# The packages of each optional source (pyproject.toml's extras of the same names).
_EXTRAS = {"tfds": "tensorflow-datasets tensorflow-cpu importlib_resources", "torchvision": "torchvision"}

# `examples_digest` of the official training and test files' examples.
OFFICIAL_DIGESTS = {
    "train": "3655811c0e1223700a4714a92a51f55bd215ed7dc1fa2baa4326a2b58042d82d",
    "test": "634538fb34c5277fce98470b8b285d1e8419eb87f328da42ef1faf690d2c3911",
}

_TORCHVISION_FIX = (
    "A torchvision built for another torch fails so (its compiled operators, such as torchvision::nms, "
    "must match the installed torch {torch}). PyPI's Linux torchvision wheels need the CUDA build of torch; "
    "with a CPU build of torch install both from PyTorch's CPU index, e.g. `pip install torch==2.13.0 "
    "torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cpu`."
)


def load_source(source: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> Mnist:
    """MNIST from `source` (one of SOURCES). `data_dir` is the official files' directory, as
    for the IDX reader (common.mnist.resolve_data_dir); tfds also finds its prepared copy there
    when the directory is a tfds data directory (holding a prepared `mnist/`)."""
    if source == "idx":
        return load_mnist(data_dir, download)
    root = resolve_data_dir(data_dir)
    if source == "tfds":
        data = _from_tfds(root, download)
    elif source == "torchvision":
        data = _from_torchvision(root)
    else:
        raise DataError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}.")
    if not is_unverified_test_dir(root):
        _check_official_examples(data, source)
    return data


def examples_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 over the sorted SHA-256 of every (label, image) example: equal for two sets of
    examples exactly when they are equal as multisets (up to SHA-256 collisions), whatever their
    order."""
    rows = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(labels), -1)], axis=1)
    per_example = sorted(hashlib.sha256(row.tobytes()).digest() for row in rows)
    return hashlib.sha256(b"".join(per_example)).hexdigest()


def _check_official_examples(data: Mnist, source: str) -> None:
    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("test", data.test_images, data.test_labels)):
        if images.shape[1:] != (28, 28) or len(images) != len(labels) or examples_digest(images, labels) != \
                OFFICIAL_DIGESTS[split]:
            raise DataError(
                f"--data-source {source}: its {split} split ({len(labels):,} examples of shape {images.shape[1:]}) "
                "is not the official MNIST's, example for example. Prepare it again from the official files "
                "(delete the prepared copy), or use --data-source idx, which verifies the files themselves.")


@contextmanager
def _optional_package(extra: str, broken_fix: str = "") -> Iterator[None]:
    """Turn the failed import of an optional source's package into an error that says what to do."""
    install = f'pip install -c constraints.txt -e ".[{extra}]" in this repository (or pip install {_EXTRAS[extra]})'
    try:
        yield
    except ImportError as error:
        raise DataError(f"--data-source {extra} needs the {extra} extra, and {error.name or 'a package of it'} "
                        f"cannot be found ({error}). Install it: {install}; or use --data-source idx, which needs "
                        "no extra.") from error
    except Exception as error:  # installed, but fails while loading: the message is all the user can act on
        raise DataError(f"--data-source {extra}: its package is installed but cannot be imported "
                        f"({type(error).__name__}: {error}). {broken_fix} Or use --data-source idx, which reads "
                        "the same files with no extra.") from error


def _from_tfds(root: Path, download: bool) -> Mnist:
    """tfds's prepared MNIST, prepared first (offline, from the official files) if tfds has none.
    Read from `root` when it is a tfds data directory, else from tfds's own ($TFDS_DATA_DIR,
    default ~/tensorflow_datasets), as tfds.load does."""
    tfds_dir = _tfds_data_dir(root)  # before TensorFlow's import, which takes seconds
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    with _optional_package("tfds"):
        import importlib_resources  # noqa: F401  (tfds 4.9 prepares datasets with it, yet does not require it)
        import tensorflow as tf
        import tensorflow_datasets as tfds
    # TensorFlow only reads files here; left alone it would reserve the GPU memory JAX or PyTorch needs.
    tf.config.set_visible_devices([], "GPU")
    builder = _tfds_builder(tfds, tfds_dir)
    if not builder.is_prepared():
        _prepare_tfds_offline(tfds, builder, root, download)
    return _read_prepared_tfds(tf, tfds, builder)


def _tfds_builder(tfds: ModuleType, tfds_dir: Path | None):
    """tfds's MNIST builder, which reads the prepared copy's dataset_info.json where there is one;
    a corrupt one fails deep in protobuf, with a message that names neither the file nor the fix."""
    from google.protobuf import json_format  # a dependency of tfds, which parses dataset_info.json with it

    try:
        return tfds.builder("mnist", data_dir=tfds_dir)
    except (json_format.ParseError, RuntimeError) as error:
        # tfds re-raises a UnicodeDecodeError (bytes that are not text) as a RuntimeError caused by it.
        if isinstance(error, RuntimeError) and not isinstance(error.__cause__, UnicodeDecodeError):
            raise
        folder = Path(tfds_dir or tfds.core.constants.DATA_DIR) / "mnist" / str(tfds.builder_cls("mnist").VERSION)
        raise _unreadable_tfds_copy(folder, f"its dataset_info.json: {error.__cause__ or error}") from error


def _read_prepared_tfds(tf: ModuleType, tfds: ModuleType, builder) -> Mnist:
    """Both splits of the prepared copy. A shard cut short within a record, cut at a record's end
    (fewer examples than dataset_info.json counts) or missing fails in TensorFlow, whose message
    names neither the file nor the fix."""
    try:
        train, test = [tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1)) for split in ("train", "test")]
    except (tf.errors.DataLossError, tf.errors.FailedPreconditionError, tf.errors.NotFoundError) as error:
        cause = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", error.message).strip()  # less TensorFlow's op and device
        raise _unreadable_tfds_copy(Path(builder.data_dir), f"{type(error).__name__}: {cause}") from error
    return Mnist(train["image"][..., 0], train["label"].astype(np.uint8),
                 test["image"][..., 0], test["label"].astype(np.uint8))


def _tfds_data_dir(root: Path) -> Path | None:
    """The tfds data directory to read: `root` when it is one, else $TFDS_DATA_DIR (None: tfds's
    default). A $TFDS_DATA_DIR that is a file is refused here: tfds would fail only deep in its
    preparation, on a NotADirectoryError that does not name the variable."""
    # dataset_info.json, not the folder alone: on macOS and Windows torchvision's MNIST/ is also mnist/.
    if any(root.glob("mnist/*/dataset_info.json")):
        return root
    value = os.environ.get(TFDS_DATA_DIR_ENV)
    if value and Path(value).exists() and not Path(value).is_dir():
        raise DataError(f"${TFDS_DATA_DIR_ENV} is {value}, which is a file, not a directory: tfds keeps its "
                        f"prepared datasets there (--data-dir {root} holds no prepared mnist/). Point "
                        f"{TFDS_DATA_DIR_ENV} at a directory, or unset it for ~/tensorflow_datasets; or use "
                        "--data-source idx.")
    return Path(value) if value else None


def _unreadable_tfds_copy(folder: Path, cause: str) -> DataError:
    """The prepared copy is the user's: they, not this project, decide to delete it."""
    return DataError(f"tfds's prepared MNIST in {folder} cannot be read ({cause}): delete {folder} to have it "
                     "prepared again from the official files, or use --data-source idx.")


def _prepare_tfds_offline(tfds: ModuleType, builder, root: Path, download: bool) -> None:
    """tfds's MNIST builder from the four official gzipped files (verified, or downloaded by this
    project's verified downloader): `manual_dir` hands them to tfds, which then needs no network;
    its scratch copies go to a temporary directory."""
    load_mnist(root, download)  # finds, verifies or downloads them, with this project's errors
    folder = next((folder for folder in (root, root / "MNIST" / "raw")
                   if all((folder / f"{spec.name}.gz").is_file() for spec in MNIST_FILES)), None)
    if folder is None:
        raise DataError(f"tfds prepares MNIST from the four official gzipped files (train-images-idx3-ubyte.gz, ...), "
                        f"and {root} holds them uncompressed only. Put the .gz files there, or point --data-dir at "
                        "a directory without MNIST files to have them downloaded.")
    print(f"tfds: preparing MNIST in {builder.data_dir} from the official files in {folder} (once, offline)",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="tfds-mnist-") as scratch:
        builder.download_and_prepare(download_dir=scratch, download_config=tfds.download.DownloadConfig(
            manual_dir=str(folder), try_download_gcs=False))


def _from_torchvision(root: Path) -> Mnist:
    """torchvision.datasets.MNIST over `root`: the uncompressed files in root/MNIST/raw, as
    torchvision's own download leaves them."""
    raw = root / "MNIST" / "raw"
    missing = [spec.name for spec in MNIST_FILES if not (raw / spec.name).is_file()]
    if missing:
        raise DataError(
            f"torchvision reads the uncompressed official files in {raw} (the layout its download leaves), and "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not there. Download them with torchvision "
            f"(python -c \"from torchvision.datasets import MNIST; MNIST('{root}', download=True)\"), or use "
            "--data-source idx, which reads any layout and downloads verified files itself.")
    with _optional_package("torchvision", _TORCHVISION_FIX.format(torch=_installed_version("torch"))):
        from torchvision.datasets import MNIST
    train_set, test_set = (MNIST(str(root), train=is_train, download=False) for is_train in (True, False))
    return Mnist(train_set.data.numpy(), train_set.targets.numpy().astype(np.uint8),
                 test_set.data.numpy(), test_set.targets.numpy().astype(np.uint8))


def _installed_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"

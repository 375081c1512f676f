"""The three data sources of common.sources: the same examples from each (tfds in its own order),
offline preparation of tfds's MNIST, clear errors where a source cannot be used, and a run that
keeps its source like its seed. The cross-framework batch equality on each source is in
tests/parity/test_data_and_trained_models.py."""

from __future__ import annotations

import argparse
import gzip
import importlib
import json
import socket
import sys

import numpy as np
import pytest

from common import cli
from common.errors import DataError
from common.mnist import MNIST_FILES, UNVERIFIED_TEST_DIR_ENV, Mnist
from common.sources import OFFICIAL_DIGESTS, TFDS_DATA_DIR_ENV, examples_digest, load_source
from tests.frameworks import JAX, TORCH
from tests.synthetic_mnist import write_synthetic_tfds

SPLITS = ("train", "test")


def sorted_examples(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Every (label, image) example as one 785-byte record, the records sorted bytewise: two sets
    of examples are equal as multisets exactly when these arrays are equal."""
    rows = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(labels), -1)], axis=1)
    return np.sort(np.ascontiguousarray(rows).view(np.dtype((np.void, rows.shape[1]))).ravel())


def split(data: Mnist, name: str) -> tuple[np.ndarray, np.ndarray]:
    return getattr(data, f"{name}_images"), getattr(data, f"{name}_labels")


def assert_same_examples_in_another_order(found: Mnist, expected: Mnist) -> None:
    for name in SPLITS:
        (images, labels), (expected_images, expected_labels) = split(found, name), split(expected, name)
        assert images.dtype == expected_images.dtype == labels.dtype == expected_labels.dtype == np.uint8
        assert images.shape == expected_images.shape and labels.shape == expected_labels.shape
        np.testing.assert_array_equal(sorted_examples(images, labels), sorted_examples(expected_images,
                                                                                       expected_labels))
        assert not np.array_equal(labels, expected_labels), f"{name}: tfds kept the files' order"


def test_tfds_source_gives_the_idx_examples_in_its_own_order(synthetic_tfds, synthetic_mnist):
    assert_same_examples_in_another_order(load_source("tfds", synthetic_tfds), synthetic_mnist)


@pytest.mark.slow
def test_tfds_prepares_the_official_files_offline_into_the_official_examples(real_mnist_dir, real_mnist, tmp_path,
                                                                            monkeypatch):
    """tfds's MNIST builder, fed the four official .gz files (tfds checks their checksums too),
    with every Python socket refusing to connect: train and test equal the IDX reader's examples
    as multisets, byte for byte."""
    def offline(*args, **kwargs):
        raise OSError("network access during the offline preparation")

    monkeypatch.setattr(socket.socket, "connect", offline)
    monkeypatch.setenv(TFDS_DATA_DIR_ENV, str(tmp_path))
    assert_same_examples_in_another_order(load_source("tfds", real_mnist_dir, download=False), real_mnist)
    assert list(tmp_path.glob("mnist/*/dataset_info.json")), "not prepared in $TFDS_DATA_DIR"
    assert not list(tmp_path.glob("downloads")), "tfds's scratch copies were left behind"


def test_the_official_digests_are_those_of_the_official_files(real_mnist):
    for name in SPLITS:
        assert examples_digest(*split(real_mnist, name)) == OFFICIAL_DIGESTS[name]


def test_tfds_data_that_is_not_the_official_mnist_is_refused(synthetic_mnist, tmp_path):
    write_synthetic_tfds(synthetic_mnist, tmp_path)  # outside the test suite's unverified directory
    with pytest.raises(DataError, match="train split .640 examples.* is not the official MNIST's"):
        load_source("tfds", tmp_path)


def test_missing_tfds_names_the_extra(monkeypatch, synthetic_dir):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # what `import` finds when it is not installed
    with pytest.raises(DataError, match=r'needs the tfds extra, and tensorflow_datasets cannot be found.*'
                                        r'pip install -c constraints.txt -e "\.\[tfds\]"'):
        load_source("tfds", synthetic_dir)


@pytest.fixture
def torchvision_layout(tmp_path, synthetic_dir, monkeypatch):
    """The synthetic files as torchvision's download leaves them: uncompressed in DIR/MNIST/raw."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for spec in MNIST_FILES:
        (raw / spec.name).write_bytes(gzip.decompress((synthetic_dir / f"{spec.name}.gz").read_bytes()))
    monkeypatch.setenv(UNVERIFIED_TEST_DIR_ENV, str(tmp_path))
    return tmp_path


def test_torchvision_source_reads_the_idx_files_where_torchvision_imports_and_says_why_not_elsewhere(
        torchvision_layout, synthetic_mnist):
    """Where torchvision imports, its MNIST must be the IDX reader's, in the same order. Where it
    does not (this project's CI: not installed; its development machines: PyPI's wheel needs the
    CUDA build of torch), the error must say so and how to fix it."""
    try:
        importlib.import_module("torchvision.datasets")
    except Exception:  # any failure to import is the case under test
        with pytest.raises(DataError, match=r"--data-source torchvision.*torchvision.*(cannot be found|cannot be "
                                            r"imported).*--data-source idx"):
            load_source("torchvision", torchvision_layout)
        return
    data = load_source("torchvision", torchvision_layout)
    for found, expected in zip(data, synthetic_mnist, strict=True):
        assert found.dtype == np.uint8
        np.testing.assert_array_equal(found, expected)


def test_broken_torchvision_build_names_the_cause_and_the_fix(torchvision_layout, tmp_path_factory, monkeypatch):
    """A stand-in package failing as PyPI's torchvision does beside the CPU build of torch."""
    package = tmp_path_factory.mktemp("site") / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    (package / "datasets.py").write_text("")
    monkeypatch.syspath_prepend(str(package.parent))
    for name in [name for name in sys.modules if name.split(".")[0] == "torchvision"]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(DataError, match=r"installed but cannot be imported \(RuntimeError: operator torchvision::nms "
                                        r"does not exist\).*download\.pytorch\.org/whl/cpu"):
        load_source("torchvision", torchvision_layout)


def test_torchvision_source_names_the_folder_it_reads(synthetic_dir):
    with pytest.raises(DataError, match=r"MNIST/raw.*train-images-idx3-ubyte, train-labels-idx1-ubyte, .* are not "
                                        r"there.*download=True"):
        load_source("torchvision", synthetic_dir)  # gzipped files beside each other: the IDX reader's layout


@pytest.mark.parametrize("framework", [JAX, TORCH], ids=["jax", "torch"])
def test_trainers_train_on_tfds_and_a_run_keeps_its_source(framework, synthetic_tfds, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data-dir", str(synthetic_tfds), "--threads", "1"]
    assert framework.main(["--dry-run", "--data-source", "tfds", "--out", str(out), *common]) == 0
    assert json.loads((out / "config.json").read_text())["data_source"] == "tfds"
    assert framework.main(["--resume", str(out), "--data-source", "idx", *common]) == 2
    assert "--data-source idx (checkpoint: tfds)" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [[], ["--data-dir", "some/dir"], ["--data-dir", "d", "--data-source", "tfds"]])
def test_benchmarks_hand_their_data_flags_to_the_processes_they_start(flags):
    parser = argparse.ArgumentParser()
    cli.add_data_flags(parser)
    assert cli.data_flags(parser.parse_args(flags)) == flags

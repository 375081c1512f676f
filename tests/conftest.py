"""Shared fixtures: the synthetic MNIST that every data-using test reads, and the real files for
the few tests of facts of the official data.

The synthetic files are written once per session into a temporary directory, which is named in
$MNIST_UNVERIFIED_TEST_DIR for the session (subprocesses inherit it): the project's reader then
reads that directory, and only that one, without the checksum check. The real files come from
$MNIST_DATA_DIR (CI always sets it). Without it, their tests are reported as skipped with the
reason, and with CI=true any skipped test fails the run (tests/no_silent_skips.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import jax
import pytest
import torch

from common.mnist import DATA_DIR_ENV, UNVERIFIED_TEST_DIR_ENV, Mnist, load_mnist
from common.sources import TFDS_DATA_DIR_ENV
from common.system import cpu_name, usable_cpu_count, usable_cpus
from tests.synthetic_mnist import write_synthetic_mnist

pytest_plugins = ["tests.no_silent_skips"]

# The data-parallel tests split batches over 2 and 4 CPU devices, which JAX creates only if asked
# before it starts; every other test uses the first of them, as it would the only one.
CPU_DEVICES = 4
jax.config.update("jax_num_cpu_devices", CPU_DEVICES)

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_report_header() -> str:
    """Every run's log names its CPU: the suite's time and the float32 results both depend on it."""
    return f"cpu: {cpu_name()}, {usable_cpu_count()} usable cores"


@pytest.fixture(autouse=True)
def _cores_and_threads_given_back() -> Iterator[None]:
    """A trainer's --threads limits the process it runs in, for good: it pins the process to that
    many cores and sizes PyTorch's thread pool. That is right for a command; a test that calls a
    trainer's main() here would otherwise leave this process, every later test, and every process
    they start (which inherit the pinning), on one core."""
    cores, torch_threads = usable_cpus(), torch.get_num_threads()
    yield
    if cores is not None and usable_cpus() != cores:
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(torch_threads)


@pytest.fixture(scope="session", autouse=True)
def _each_jax_program_compiled_once(tmp_path_factory) -> Iterator[None]:
    """JAX's persistent compilation cache, in a directory of this session only (subprocesses
    inherit it). Many tests build a trainer for shapes another test has compiled already; each
    trainer jits new functions, which would otherwise compile the same programs again."""
    from jax_impl.fast.compile_clock import enable_compilation_cache

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax-compilation-cache")))
        enable_compilation_cache()
        yield


@pytest.fixture(scope="session", autouse=True)
def _tfds_data_dir_of_the_session(tmp_path_factory) -> Iterator[None]:
    """tfds's data directory for the session, so that no test prepares anything in the user's
    ~/tensorflow_datasets."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TFDS_DATA_DIR_ENV, str(tmp_path_factory.mktemp("tensorflow_datasets")))
        yield


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Iterator[Path]:
    """A directory holding the synthetic MNIST as four gzipped IDX files."""
    directory = write_synthetic_mnist(tmp_path_factory.mktemp("synthetic-mnist"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(UNVERIFIED_TEST_DIR_ENV, str(directory))
        yield directory


@pytest.fixture(scope="session")
def synthetic_mnist(synthetic_dir: Path) -> Mnist:
    return load_mnist(synthetic_dir, download=False)


@pytest.fixture(scope="session")
def real_mnist_dir() -> Path:
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        pytest.skip(f"a fact of the official MNIST files: set {DATA_DIR_ENV} to a directory holding them")
    return Path(value)


@pytest.fixture(scope="session")
def real_mnist(real_mnist_dir: Path) -> Mnist:
    return load_mnist(real_mnist_dir, download=False)


@pytest.fixture(scope="session")
def synthetic_tfds(synthetic_dir: Path, synthetic_mnist: Mnist) -> Path:
    """The synthetic MNIST also as tfds's prepared dataset, stored in the synthetic directory
    itself (`synthetic_dir/mnist/<version>`), which makes that directory a tfds data directory
    too: `--data-source tfds --data-dir synthetic_dir` reads it, unverified like the IDX files."""
    from tests.synthetic_mnist import write_synthetic_tfds

    return write_synthetic_tfds(synthetic_mnist, synthetic_dir)

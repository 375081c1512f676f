"""Shared fixtures. Tests that need the real MNIST files run whenever $MNIST_DATA_DIR is set
(CI always sets it); without it they are reported as skipped, with the reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.mnist import DATA_DIR_ENV, Mnist, load_mnist

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        pytest.skip(f"needs the real MNIST files: set {DATA_DIR_ENV}")
    return Path(value)


@pytest.fixture(scope="session")
def mnist(mnist_dir: Path) -> Mnist:
    return load_mnist(mnist_dir, download=False)

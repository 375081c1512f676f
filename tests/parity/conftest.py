"""Fixtures of the parity suite."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from tests.parity.mutations import apply_from_environment

apply_from_environment()  # a deliberate mistake, when tests.parity.mutations runs the suite


@pytest.fixture
def float64():
    """Run a test with 64-bit JAX arrays enabled (PyTorch models are cast per test)."""
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


@pytest.fixture(scope="session")
def test_images(mnist) -> np.ndarray:
    """The first 256 real test images, normalised, (N, 1, 28, 28) float32."""
    from common.transforms import normalize

    return normalize(mnist.test_images[:256])[:, None]


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)

"""Fixtures of the parity suite.

Every test runs at the highest float32 precision of both frameworks. On recent NVIDIA GPUs both
compute float32 convolutions and matmuls in TF32 by default (10-bit mantissa, ~1e-3 relative),
which would make the float32 tolerances below meaningless; on CPUs these settings change nothing.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from jax_impl.fast.choice import layers_for
from tests.parity.mutations import apply_from_environment

apply_from_environment()  # a deliberate mistake, when tests.parity.mutations runs the suite


@pytest.fixture
def float64():
    """Run a test with 64-bit JAX arrays enabled (PyTorch models are cast per test)."""
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


@pytest.fixture(params=["float32", "float64"])
def precision_name(request) -> str:
    """A test run once in float32 and once in float64, with 64-bit JAX arrays enabled for the latter;
    each module maps the name to its dtypes and tolerance."""
    if request.param == "float64":
        jax.config.update("jax_enable_x64", True)
    yield request.param
    jax.config.update("jax_enable_x64", False)


@pytest.fixture(scope="session")
def synthetic_images(synthetic_mnist) -> np.ndarray:
    """The first 256 synthetic training images, normalised, (N, 1, 28, 28) float32."""
    from common.transforms import normalize

    return normalize(synthetic_mnist.train_images[:256])[:, None]


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(autouse=True)
def _highest_precision():
    """Full float32 convolutions and matmuls: no TF32 in PyTorch's cuDNN and CUDA matmuls, and
    "highest" as JAX's default precision for both."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    with jax.default_matmul_precision("highest"):
        yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(params=["plain", "fast"])
def ops(request) -> str:
    """Each test that runs the JAX model runs it with both layer implementations (jax_impl.fast.choice)."""
    return request.param


@pytest.fixture
def layers(ops):
    return layers_for(ops)

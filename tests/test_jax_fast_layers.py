"""The fast layers (jax_impl.fast.layers) compute what the plain model computes.

float64 throughout, with the same injected dropout masks, so the two differ by the order of
floating-point sums alone (a chunked kernel gradient, nine shifted products for conv1, the
closed-form BatchNorm tangent): each result agrees to ~1e-15, and 1e-12 relative to the
tensor's norm leaves a thousandfold margin while catching any difference in the maths.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl.fast.choice import layers_for, resolve_ops
from jax_impl.model import Net
from jax_impl.training import training_loss
from tests.parity.helpers import DROPOUT_LAYERS, flax_masks

BATCH = 24  # two weight-gradient chunks of the fast convolution: 16 + 8
RELATIVE = 1e-12


@pytest.fixture
def float64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def problem():
    """Random float64 weights (non-trivial BatchNorm parameters and statistics), images, labels
    and NHWC dropout masks."""
    rng = np.random.default_rng(0)
    variables = Net().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
    variables = jax.tree_util.tree_map(lambda leaf: leaf + 0.2 * rng.normal(size=leaf.shape), variables)
    variables["batch_stats"] = jax.tree_util.tree_map(jnp.abs, variables["batch_stats"])  # variances > 0
    images = jnp.asarray(rng.normal(size=(BATCH, 28, 28, 1)))
    labels = jnp.asarray(rng.integers(0, 10, BATCH).astype(np.int32))
    masks = {name: jnp.asarray(rng.random((BATCH, h, w, c)) < 0.85) for name, (c, h, w) in DROPOUT_LAYERS.items()}
    return variables, images, labels, masks


@partial(jax.jit, static_argnums=0)
def run(ops: str, variables, images, labels, masks):
    """Eval log-probs, train log-probs, updated statistics and parameter gradients."""
    model = Net(layers=layers_for(ops))
    evaluated = model.apply(variables, images, train=False)

    def loss(params):
        with flax_masks(masks):
            log_probs, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                                             train=True, mutable=["batch_stats"])
        return training_loss(log_probs, labels), (log_probs, updates["batch_stats"])

    (_, (trained, batch_stats)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    return {"eval": evaluated, "train": trained, "batch_stats": batch_stats, "grads": grads}


def test_fast_layers_equal_plain_layers_in_float64(float64):
    arguments = problem()
    plain, fast = run("plain", *arguments), run("fast", *arguments)
    for what in plain:
        leaves = zip(jax.tree_util.tree_leaves_with_path(plain[what]), jax.tree_util.tree_leaves(fast[what]),
                     strict=True)
        for (path, expected), ours in leaves:
            assert expected.dtype == jnp.float64
            error = np.linalg.norm(ours - expected) / np.linalg.norm(expected)
            assert error <= RELATIVE, f"{what}{jax.tree_util.keystr(path)}: relative error {error:.1e}"


def test_auto_is_fast_on_cpu_only():
    assert resolve_ops("auto", "cpu") == "fast"
    assert resolve_ops("auto", "gpu") == resolve_ops("auto", "tpu") == "plain"
    assert resolve_ops("plain", "cpu") == "plain" and resolve_ops("fast", "gpu") == "fast"
    with pytest.raises(ValueError, match="unknown ops"):
        resolve_ops("turbo", "cpu")

"""jax_impl.fast_ops compute exactly what the plain Flax/XLA operations compute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from common.recipes import SEED
from jax_impl.fast_ops import conv_valid, make_chunked_weight_grad_conv, max_pool_2x2
from jax_impl.steps import create_train_state, nll_loss


@pytest.fixture
def float64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def reference_pool(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))


@pytest.mark.parametrize("compile_it", [False, True], ids=["eager", "jit"])
def test_max_pool_equals_flax_including_ties(compile_it):
    # Small integers make ties frequent, as ReLU zeros followed by BatchNorm do in the model.
    x = jnp.asarray(np.random.default_rng(0).integers(-2, 3, (8, 10, 12, 4)).astype(np.float32))
    grad_out = jnp.asarray(np.random.default_rng(1).normal(size=(8, 5, 6, 4)).astype(np.float32))

    def forward_and_grad(pool):
        out, vjp = jax.vjp(pool, x)
        return out, vjp(grad_out)[0]

    run = jax.jit(forward_and_grad, static_argnums=0) if compile_it else forward_and_grad
    (ours, our_grad), (theirs, their_grad) = run(max_pool_2x2), run(reference_pool)
    # Same maxima and the gradient on the same (first) element of each window: exactly equal.
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(our_grad, their_grad)
    assert (np.asarray(our_grad) != 0).sum() == grad_out.size  # one receiver per window, ties or not


def test_max_pool_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even height and width"):
        max_pool_2x2(jnp.zeros((1, 5, 4, 1)))


@pytest.mark.parametrize("batch", [7, 16, 37])
def test_chunked_weight_gradient_conv_equals_xla(float64, batch):
    rng = np.random.default_rng(batch)
    x = jnp.asarray(rng.normal(size=(batch, 9, 9, 3)))
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 5)))
    grad_out = jnp.asarray(rng.normal(size=(batch, 7, 7, 5)))
    chunked = make_chunked_weight_grad_conv(16)
    ours, our_vjp = jax.vjp(lambda a, k: chunked(a, k, (1, 1), "VALID"), x, kernel)
    theirs, their_vjp = jax.vjp(conv_valid, x, kernel)
    np.testing.assert_array_equal(ours, theirs)
    # float64: only the order of the sum over examples differs, so agreement to ~1e-15.
    for a, b in zip(our_vjp(grad_out), their_vjp(grad_out), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_single_channel_conv_as_shifted_sums_equals_xla(float64):
    """conv1's path: one input channel goes through shifted_sum_conv, forward and backward."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(20, 28, 28, 1)))
    kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 8)))
    grad_out = jnp.asarray(rng.normal(size=(20, 26, 26, 8)))
    chunked = make_chunked_weight_grad_conv(16)
    ours, our_vjp = jax.vjp(lambda a, k: chunked(a, k, (1, 1), "VALID"), x, kernel)
    theirs, their_vjp = jax.vjp(conv_valid, x, kernel)
    # float64, and only the order of the 9-term sum differs: agreement to a few ulps.
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    for a, b in zip(our_vjp(grad_out), their_vjp(grad_out), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_chunked_conv_refuses_what_it_does_not_implement():
    conv = make_chunked_weight_grad_conv(16)
    with pytest.raises(NotImplementedError):
        conv(jnp.zeros((1, 8, 8, 1)), jnp.zeros((3, 3, 1, 1)), (2, 2), "VALID")
    with pytest.raises(NotImplementedError):
        conv(jnp.zeros((1, 8, 8, 1)), jnp.zeros((3, 3, 1, 1)), (1, 1), [(1, 1), (1, 1)])


def test_model_gradients_do_not_depend_on_chunking(float64):
    """Whole-model loss gradients with and without chunked weight gradients, float64, with
    batch statistics and no dropout, so the two differ by summation order alone."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(40, 28, 28, 1)))
    labels = jnp.asarray(rng.integers(0, 10, 40).astype(np.int32))
    recipe = SEED.with_overrides(dropout=0.0)

    def gradients(chunk):
        state = create_train_state(jax.random.key(0), recipe, 10, weight_grad_chunk=chunk)
        state = state.replace(params=jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), state.params))

        def loss(params):
            log_probs, _ = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, images,
                                          train=True, mutable=["batch_stats"])
            return nll_loss(log_probs, labels)

        return jax.grad(loss)(state.params)

    for a, b in zip(jax.tree_util.tree_leaves(gradients(16)), jax.tree_util.tree_leaves(gradients(None)),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)

"""jax_impl.fast.ops compute exactly what the plain Flax/XLA operations compute."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from jax_impl.fast.ops import conv_valid, keep_mask, make_chunked_weight_grad_conv, max_pool_2x2


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


def test_the_compiled_dropout_and_pooling_gradient_hashes_only_into_the_stored_mask():
    """keep_mask's layout choice, checked on what XLA:CPU compiles: every fusion that runs the
    Threefry rounds (its uint32 shifts) outputs the mask itself (pred), so no forward or gradient
    pass recomputes the hash from the key. Written as one expression, the mask is fused into
    the float passes of dropout -> max pooling and their gradients instead."""
    def loss(x, key):
        kept = jnp.where(keep_mask(key, x.shape, 0.9), x / 0.9, 0)
        return jnp.sum(max_pool_2x2(kept) ** 2)

    compiled = jax.jit(jax.value_and_grad(loss)).lower(jnp.ones((4, 8, 8, 16)), jax.random.key(0)).compile()
    text = compiled.as_text()
    bodies = dict(re.findall(r"(?m)^(%\S+) \(.*\{\n((?:.*\n)*?)\}", text))
    hashing = {name for name, body in bodies.items() if re.search(r"u32\[[0-9,]+\]\S* shift-left\(", body)}
    outputs = [element_type for element_type, computation in
               re.findall(r"= (\w+)\[[0-9,]*\]\S* fusion\(.*calls=(%[\w.]+)", text) if computation in hashing]
    assert hashing and outputs and set(outputs) == {"pred"}, (hashing, outputs)


NHWC = ("NHWC", "HWIO", "NHWC")


def chunked_conv(chunk=16, **arguments):
    """The fast convolution as nn.Conv calls it, on NHWC inputs and HWIO kernels."""
    conv = make_chunked_weight_grad_conv(chunk)
    return lambda x, kernel: conv(x, kernel, (1, 1), "VALID", dimension_numbers=NHWC, **arguments)


@pytest.mark.parametrize("batch", [7, 16, 37])
def test_chunked_weight_gradient_conv_equals_xla(float64, batch):
    rng = np.random.default_rng(batch)
    x = jnp.asarray(rng.normal(size=(batch, 9, 9, 3)))
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 5)))
    grad_out = jnp.asarray(rng.normal(size=(batch, 7, 7, 5)))
    ours, our_vjp = jax.vjp(chunked_conv(), x, kernel)
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
    ours, our_vjp = jax.vjp(chunked_conv(), x, kernel)
    theirs, their_vjp = jax.vjp(conv_valid, x, kernel)
    # float64, and only the order of the 9-term sum differs: agreement to a few ulps.
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    for a, b in zip(our_vjp(grad_out), their_vjp(grad_out), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arguments", [
    {"window_strides": (2, 2)}, {"padding": [(1, 1), (1, 1)]}, {"padding": "SAME"}, {"lhs_dilation": (2, 2)},
    {"rhs_dilation": (2, 2)}, {"dimension_numbers": ("NCHW", "OIHW", "NCHW")}, {"dimension_numbers": None},
    {"feature_group_count": 2}, {"batch_group_count": 2}, {"preferred_element_type": jnp.float64},
], ids=lambda arguments: next(iter(arguments)) + "=" + str(next(iter(arguments.values()))))
def test_chunked_conv_refuses_every_argument_it_does_not_implement(arguments):
    """Every argument of lax.conv_general_dilated that the fast convolution cannot honour raises,
    naming it, rather than being ignored."""
    call = {"window_strides": (1, 1), "padding": "VALID", "dimension_numbers": NHWC, **arguments}
    with pytest.raises(NotImplementedError, match=next(iter(arguments))):
        make_chunked_weight_grad_conv(16)(jnp.zeros((2, 8, 8, 2)), jnp.zeros((3, 3, 2, 2)), **call)


@pytest.mark.parametrize("precision", [lax.Precision.HIGHEST, lax.Precision.HIGH])
def test_chunked_conv_passes_its_precision_to_every_convolution(precision):
    """Forward, input gradient and each chunk's kernel gradient run at the precision asked for
    (what TF32 on a GPU depends on)."""
    conv = chunked_conv(precision=precision)
    loss = jax.grad(lambda x, kernel: conv(x, kernel).sum(), argnums=(0, 1))
    jaxpr = str(jax.make_jaxpr(loss)(jnp.ones((20, 5, 5, 2)), jnp.ones((3, 3, 2, 4))))
    convolutions = jaxpr.count("conv_general_dilated[")
    assert convolutions == 4  # forward, input gradient, kernel gradients of 2 chunks (16 + 4)
    assert jaxpr.count(f"precision=(Precision.{precision.name}, Precision.{precision.name})") == convolutions

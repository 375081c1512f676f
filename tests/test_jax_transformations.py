"""JAX's transformations run through the model, plain and fast, and give true derivatives.

float64, train mode (batch statistics), no dropout, so the loss is a deterministic, piecewise
smooth function of the parameters. Derivatives are checked against central finite differences
along one random direction:
- jax.jvp (forward mode) against (L(p + hv) - L(p - hv)) / 2h with h = 1e-7: truncation error
  O(h^2) ~ 1e-14, rounding ~1e-16 * |L| / h ~ 1e-9 of the derivative; 1e-6 relative bounds both.
- Hessian-vector products, forward-over-reverse (jax.jvp of jax.grad) and reverse-over-reverse
  (grad of grad), against (g(p + hv) - g(p - hv)) / 2h with h = 1e-6: truncation ~1e-12,
  rounding ~1e-16 * |g| / h ~ 1e-10 of |Hv|; 1e-6 relative bounds both. A finite step could
  cross a ReLU or max-pool kink, where the gradient jumps; with h = 1e-6 on these fixed inputs
  none does (the test is deterministic).
- jax.jacfwd against jax.jacrev of the log-probabilities with respect to the images: two exact
  derivatives computed in different orders, 1e-12 relative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl.fast.choice import layers_for
from jax_impl.model import Net
from jax_impl.training import training_loss

BATCH = 6


@pytest.fixture(autouse=True)
def float64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


@pytest.fixture(params=["plain", "fast"])
def setup(request):
    """(log-probs of (params, images), loss of params, params, images, a random direction)."""
    model = Net(dropout=0.0, layers=layers_for(request.param))
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(BATCH, 28, 28, 1)))
    labels = jnp.asarray(rng.integers(0, 10, BATCH).astype(np.int32))
    variables = model.init(jax.random.key(0), images, train=False)
    params = jax.tree_util.tree_map(lambda leaf: leaf.astype(jnp.float64), variables["params"])
    direction = jax.tree_util.tree_map(lambda leaf: jnp.asarray(rng.normal(size=leaf.shape)), params)

    def log_probs(params, images):
        out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images, train=True,
                             mutable=["batch_stats"])
        return out

    return log_probs, jax.jit(lambda p: training_loss(log_probs(p, images), labels)), params, images, direction


def moved(params, direction, step):
    return jax.tree_util.tree_map(lambda p, v: p + step * v, params, direction)


def flat(tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)])


def relative_error(ours, expected) -> float:
    return float(jnp.linalg.norm(flat(ours) - flat(expected)) / jnp.linalg.norm(flat(expected)))


def test_jvp_equals_finite_differences(setup):
    _, loss, params, _, direction = setup
    _, derivative = jax.jit(lambda p, v: jax.jvp(loss, (p,), (v,)))(params, direction)
    h = 1e-7
    finite = (loss(moved(params, direction, h)) - loss(moved(params, direction, -h))) / (2 * h)
    assert abs(float(derivative) - float(finite)) <= 1e-6 * abs(float(finite))


def test_hessian_vector_products_forward_and_reverse_equal_finite_differences(setup):
    _, loss, params, _, direction = setup
    gradient = jax.jit(jax.grad(loss))
    forward_over_reverse = jax.jit(lambda p, v: jax.jvp(jax.grad(loss), (p,), (v,))[1])(params, direction)
    grad_of_grad = jax.jit(jax.grad(lambda p, v: jnp.vdot(flat(jax.grad(loss)(p)), flat(v))))
    reverse_over_reverse = grad_of_grad(params, direction)
    h = 1e-6
    finite = jax.tree_util.tree_map(lambda a, b: (a - b) / (2 * h), gradient(moved(params, direction, h)),
                                    gradient(moved(params, direction, -h)))
    assert relative_error(forward_over_reverse, finite) <= 1e-6
    assert relative_error(reverse_over_reverse, finite) <= 1e-6


def test_jacfwd_equals_jacrev(setup):
    log_probs, _, params, images, _ = setup
    images = images[:2]
    forward = jax.jit(jax.jacfwd(log_probs, argnums=1))(params, images)
    reverse = jax.jit(jax.jacrev(log_probs, argnums=1))(params, images)
    assert forward.shape == (2, 10, 2, 28, 28, 1)
    assert relative_error(forward, reverse) <= 1e-12

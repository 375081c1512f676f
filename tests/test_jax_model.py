"""jax_impl's model: table, shapes, PyTorch BatchNorm semantics, dropout, initialisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.spec import LAYER_TABLE, TOTAL_PARAMS, format_layer_table
from jax_impl.model import BatchNorm2d, Net
from jax_impl.summary import layer_rows, summary
from tests.test_spec import spec_table_block

IMAGE = jnp.zeros((1, 28, 28, 1), jnp.float32)


def init(model=None, seed=0):
    return (model or Net()).init(jax.random.key(seed), IMAGE, train=False)


def test_parameter_count_and_buffers():
    variables = init()
    assert sum(x.size for x in jax.tree_util.tree_leaves(variables["params"])) == TOTAL_PARAMS == 4328
    assert sum(x.size for x in jax.tree_util.tree_leaves(variables["batch_stats"])) == 128
    assert not any("bias" in path for path in _paths(variables["params"]) if path.startswith("conv"))


def _paths(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _paths(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_layer_table_from_shape_evaluation_equals_spec():
    assert layer_rows(Net()) == list(LAYER_TABLE)
    assert summary(Net()) == format_layer_table(LAYER_TABLE) == spec_table_block()


@pytest.mark.parametrize("train", [False, True])
def test_output_shape_and_probabilities(train):
    variables = init()
    images = jax.random.normal(jax.random.key(1), (7, 28, 28, 1))
    out, _ = Net().apply(variables, images, train=train, rngs={"dropout": jax.random.key(2)},
                         mutable=["batch_stats"])
    assert out.shape == (7, 10) and out.dtype == jnp.float32
    # A float32 sum of ten probabilities: rounding error below 10 * 2**-24 = 6e-7.
    np.testing.assert_allclose(np.exp(out).sum(axis=1), np.ones(7), rtol=0, atol=1e-6)


def test_batchnorm_matches_pytorch_semantics_written_in_numpy():
    """Three train-mode steps and one eval step against PyTorch's rule written out in NumPy
    (float64, so only the order of reductions differs: tolerance 1e-12)."""
    jax.config.update("jax_enable_x64", True)
    try:
        layer = BatchNorm2d()
        rng = np.random.default_rng(0)
        x0 = rng.normal(2.0, 3.0, (4, 5, 5, 3))
        variables = layer.init(jax.random.key(0), x0, train=False)
        scale, bias = rng.normal(size=3), rng.normal(size=3)
        variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": variables["batch_stats"]}
        running_mean, running_var = np.zeros(3), np.ones(3)
        for step in range(3):
            x = rng.normal(step, 1 + step, (4, 5, 5, 3))
            out, updates = layer.apply(variables, x, train=True, mutable=["batch_stats"])
            mean, biased_var = x.mean((0, 1, 2)), x.var((0, 1, 2))
            n = x.size // 3
            expected = (x - mean) / np.sqrt(biased_var + 1e-5) * scale + bias
            running_mean = 0.9 * running_mean + 0.1 * mean
            running_var = 0.9 * running_var + 0.1 * biased_var * n / (n - 1)
            np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(updates["batch_stats"]["mean"], running_mean, rtol=1e-12)
            np.testing.assert_allclose(updates["batch_stats"]["var"], running_var, rtol=1e-12)
            variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
        x = rng.normal(size=(2, 5, 5, 3))
        out = layer.apply(variables, x, train=False)
        np.testing.assert_allclose(out, (x - running_mean) / np.sqrt(running_var + 1e-5) * scale + bias,
                                   rtol=1e-12, atol=1e-12)
    finally:
        jax.config.update("jax_enable_x64", False)


def _dropout_mask(key):
    """Which activations drop1 zeroed, read off its captured output for an all-ones input path."""
    model = Net()
    variables = init(model)
    images = jax.random.normal(jax.random.key(5), (64, 28, 28, 1))
    _, state = model.apply(variables, images, train=True, rngs={"dropout": key},
                           capture_intermediates=lambda m, _: m.name in ("bn2", "drop1"),
                           mutable=["intermediates", "batch_stats"])
    before = state["intermediates"]["bn2"]["__call__"][0]
    after = state["intermediates"]["drop1"]["__call__"][0]
    kept = after != 0
    np.testing.assert_allclose(after[kept], before[kept] / 0.85, rtol=1e-6)  # inverted dropout scaling
    return np.asarray(kept)


def test_dropout_masks_follow_the_key():
    first, again, other = (_dropout_mask(jax.random.key(k)) for k in (1, 1, 2))
    np.testing.assert_array_equal(first, again)
    assert (first != other).mean() > 0.2
    # 64 * 16 * 24 * 24 = 589,824 Bernoulli(0.15) draws: standard deviation 0.00046.
    assert 1 - first.mean() == pytest.approx(0.15, abs=5 * 0.00046)
    # Element-wise: a channel is not dropped as a whole (as Dropout2d would do).
    per_channel = first.reshape(64, -1, 16).mean(axis=1)
    assert ((per_channel > 0) & (per_channel < 1)).all()


def test_initialisation_follows_pytorch_defaults():
    params = init(seed=3)["params"]
    for name, fan_in in {"conv1": 9, "conv2": 72, "conv4": 72, "conv6": 144}.items():
        kernel = np.asarray(params[name]["kernel"])
        bound = 1 / np.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5))
        assert np.abs(kernel).max() <= bound
        # Uniform(-b, b) has standard deviation b / sqrt(3); n >= 72 draws: within 25%.
        assert kernel.std() == pytest.approx(bound / np.sqrt(3), rel=0.25)
    for i in range(1, 6):
        assert (np.asarray(params[f"bn{i}"]["scale"]) == 1).all()
        assert (np.asarray(params[f"bn{i}"]["bias"]) == 0).all()


def test_padding_is_valid_and_kernels_are_hwio():
    params = init()["params"]
    assert params["conv2"]["kernel"].shape == (3, 3, 8, 16)
    assert params["conv3"]["kernel"].shape == (1, 1, 16, 8)

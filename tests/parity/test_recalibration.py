"""(k) BatchNorm recalibration: torch.optim.swa_utils.update_bn with dropout off, and JAX's pass.

The PyTorch side is checked against the rule itself (every batch's mean and unbiased variance,
computed here from the BatchNorm inputs, weighed equally), the JAX side against PyTorch.
Tolerances: float64 1e-10, the suite's bound for long float64 reductions (each statistic sums up
to 640 x 24 x 24 values, in another order in each framework). float32: 1e-5 relative and
absolute, as for the running statistics of the train-mode forward test (test_forward.py); the
cumulative average adds one rounding per batch to statistics of order 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from common.transforms import normalize
from jax_impl.recalibration import batch_statistics, recalibrated_batch_stats, statistics_model
from tests.parity.helpers import flax_variables, torch_model
from torch_ref.recalibration import recalibrate_batchnorm

PRECISIONS = {"float32": (torch.float32, jnp.float32, np.float32, 1e-5),
              "float64": (torch.float64, jnp.float64, np.float64, 1e-10)}
BATCH = 96  # 640 synthetic images: six batches of 96 and a last one of 64, which weighs as much as the others
BATCHNORMS = [f"bn{i}" for i in range(1, 6)]


@pytest.fixture
def precision(precision_name):
    return PRECISIONS[precision_name]


@pytest.fixture(scope="module")
def training_images(synthetic_mnist) -> np.ndarray:
    return normalize(synthetic_mnist.train_images)


def statistics_by_hand(model: torch.nn.Module, images: np.ndarray, batch_size: int) -> dict[str, tuple]:
    """update_bn's result from its definition: the inputs of every BatchNorm in train mode with
    dropout off, batch by batch; the mean over batches of each batch's mean and unbiased variance."""
    inputs: dict[str, list[np.ndarray]] = {name: [] for name in BATCHNORMS}
    hooks = [getattr(model, name).register_forward_pre_hook(
        lambda module, args, name=name: inputs[name].append(args[0].double().numpy().copy())) for name in BATCHNORMS]
    for dropout in (model.drop1, model.drop2):
        dropout.p = 0.0
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            model(torch.as_tensor(images[start : start + batch_size, None]))
    for hook in hooks:
        hook.remove()
    return {name: (np.mean([x.mean(axis=(0, 2, 3)) for x in batches], axis=0),
                   np.mean([x.var(axis=(0, 2, 3), ddof=1) for x in batches], axis=0))
            for name, batches in inputs.items()}


def test_torch_recalibration_is_the_equal_weight_average_of_batch_statistics_with_dropout_off(training_images):
    model = torch_model(dtype=torch.float64)
    images = training_images.astype(np.float64)
    weights_before = {name: value.clone() for name, value in model.named_parameters()}
    expected = statistics_by_hand(torch_model(dtype=torch.float64), images, BATCH)
    recalibrate_batchnorm(model, images, BATCH, torch.device("cpu"))
    for name in BATCHNORMS:
        bn = getattr(model, name)
        np.testing.assert_allclose(bn.running_mean.numpy(), expected[name][0], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(bn.running_var.numpy(), expected[name][1], rtol=1e-10, atol=1e-10)
    assert model.drop1.p == model.drop2.p == 0.15  # restored
    for name, value in model.named_parameters():
        assert torch.equal(value, weights_before[name]), f"{name} changed"


def test_dropout_left_on_would_give_other_statistics(training_images):
    """What switching dropout off changes: update_bn alone (dropout on) lands far from the result."""
    on, off = torch_model(dtype=torch.float64), torch_model(dtype=torch.float64)
    images = training_images.astype(np.float64)
    with torch.no_grad():
        torch.optim.swa_utils.update_bn((torch.as_tensor(images[s : s + BATCH, None])
                                         for s in range(0, len(images), BATCH)), on)
    recalibrate_batchnorm(off, images, BATCH, torch.device("cpu"))
    assert max(float((on.bn3.running_mean - off.bn3.running_mean).abs().max()),
               float((on.bn3.running_var - off.bn3.running_var).abs().max())) > 1e-2


def test_jax_recalibration_equals_pytorchs(training_images, precision, layers):
    torch_dtype, jax_dtype, numpy_dtype, tolerance = precision
    model = torch_model(dtype=torch_dtype)
    variables = flax_variables(model, jax_dtype)
    images = training_images.astype(numpy_dtype)
    recalibrate_batchnorm(model, images, BATCH, torch.device("cpu"))
    statistics = jax.jit(functools.partial(batch_statistics, statistics_model(layers)))
    ours = recalibrated_batch_stats(statistics, variables, images, BATCH, jax.devices("cpu")[0])
    for name in BATCHNORMS:
        bn = getattr(model, name)
        np.testing.assert_allclose(np.asarray(ours[name]["mean"]), bn.running_mean.numpy(), rtol=tolerance,
                                   atol=tolerance)
        np.testing.assert_allclose(np.asarray(ours[name]["var"]), bn.running_var.numpy(), rtol=tolerance,
                                   atol=tolerance)

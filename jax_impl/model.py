"""The Session 6 model in idiomatic Flax, used functionally through `init` and `apply`.

Layout is NHWC with HWIO kernels (PyTorch: NCHW, OIHW). Submodules carry the PyTorch
attribute names (conv1..conv6, bn1..bn5, drop1, drop2, pool1, pool2, gap1) so the layer
table and weight conversion can be read off by name. Two PyTorch conventions are
reproduced on purpose, because Flax's defaults differ and would change what a recipe does:
BatchNorm statistics (see `BatchNorm2d`) and the initial weight distribution.

This is the model a porter writes, and the one JAX differentiates in every mode (`jax.grad`,
`jax.jvp`, `jax.jacfwd`, Hessians). `Net.layers` can swap in other implementations of the
same layers; jax_impl.fast.layers has CPU-tuned ones, chosen per run in jax_impl.fast.choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from common.spec import BATCHNORM_EPS, BATCHNORM_MOMENTUM, DROPOUT_RATE

# PyTorch's default Conv2d init, kaiming_uniform(a=sqrt(5)): U(-b, b) with b = 1/sqrt(fan_in).
# variance_scaling with scale 1/3 and a uniform distribution has limit sqrt(3 * scale / fan_in).
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def bessel_correction(count: int) -> float:
    """n / (n - 1): turns the biased batch variance into the unbiased one PyTorch keeps."""
    return count / (count - 1)


class BatchNorm2d(nn.Module):
    """BatchNorm with PyTorch's semantics, which Flax's `nn.BatchNorm` does not have.

    Training normalises with the batch mean and the biased batch variance, and updates
    running = (1 - momentum) * running + momentum * batch with momentum 0.1 (Flax writes the
    same rule with momentum 0.9) and the UNBIASED batch variance, n / (n - 1) times the biased
    one (Flax stores the biased one). Evaluation normalises with the running statistics.
    """

    momentum: float = BATCHNORM_MOMENTUM
    epsilon: float = BATCHNORM_EPS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), x.dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), x.dtype)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), x.dtype)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), x.dtype)
        if not train:
            return (x - running_mean.value) * lax.rsqrt(running_var.value + self.epsilon) * scale + bias
        y, mean, var = self.normalize_with_batch_statistics(x, scale, bias)
        if not self.is_initializing():
            # The running averages are bookkeeping, not part of the loss: no gradient flows into them.
            mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
            count = x.size // features
            running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
            running_var.value = (1 - self.momentum) * running_var.value + self.momentum * var * (
                bessel_correction(count)
            )
        return y

    def normalize_with_batch_statistics(self, x: jax.Array, scale: jax.Array,
                                        bias: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return normalize_with_batch_statistics(x, scale, bias, self.epsilon)


def normalize_with_batch_statistics(x: jax.Array, scale: jax.Array, bias: jax.Array,
                                    epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(normalised x, batch mean, biased batch variance) over all axes but the channels; both
    Flax twins' BatchNorm (the NNX one in nnx_impl.model)."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = jnp.square(x - mean).mean(axes)  # two passes, no cancellation (as PyTorch)
    return (x - mean) * lax.rsqrt(var + epsilon) * scale + bias, mean, var


class MaxPool2d(nn.Module):
    """2x2 max pooling, stride 2. A module only so that it gets a row in the layer table."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.max_pool(x, (2, 2), strides=(2, 2))


class AvgPool2d(nn.Module):
    """Average pooling over a `window` x `window` patch, stride `window`."""

    window: int = 3

    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.avg_pool(x, (self.window, self.window), strides=(self.window, self.window))


@dataclass(frozen=True)
class Layers:
    """The implementation of each kind of layer `Net` is built from: the convolution function
    `nn.Conv` calls, and the BatchNorm, Dropout and max-pool modules."""

    conv_general_dilated: Callable
    batchnorm: type[BatchNorm2d]
    dropout: type[nn.Dropout]
    max_pool: type[MaxPool2d]


PLAIN_LAYERS = Layers(conv_general_dilated=lax.conv_general_dilated, batchnorm=BatchNorm2d, dropout=nn.Dropout,
                      max_pool=MaxPool2d)


def conv_block(x: jax.Array, conv: nn.Module, batchnorm: nn.Module, train: bool) -> jax.Array:
    """conv -> ReLU -> BatchNorm: the seed's order (BatchNorm after the ReLU)."""
    return batchnorm(nn.relu(conv(x)), train)


class Net(nn.Module):
    """4,328 parameters; (N, 28, 28, 1) normalised images -> (N, 10) log-probabilities.

    `train=True` uses batch statistics, updates `batch_stats` (pass mutable=["batch_stats"])
    and applies dropout with the "dropout" random key.
    """

    dropout: float = DROPOUT_RATE
    layers: Layers = PLAIN_LAYERS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        layers = self.layers
        conv = partial(nn.Conv, padding="VALID", use_bias=False, kernel_init=torch_conv_init,
                       conv_general_dilated=layers.conv_general_dilated)
        drop = partial(layers.dropout, rate=self.dropout, deterministic=not train)
        pool = layers.max_pool

        x = conv_block(x, conv(8, (3, 3), name="conv1"), layers.batchnorm(name="bn1"), train)
        x = conv_block(x, conv(16, (3, 3), name="conv2"), layers.batchnorm(name="bn2"), train)
        x = pool(name="pool1")(drop(name="drop1")(x))
        x = conv_block(x, conv(8, (1, 1), name="conv3"), layers.batchnorm(name="bn3"), train)
        x = conv_block(x, conv(16, (3, 3), name="conv4"), layers.batchnorm(name="bn4"), train)
        x = pool(name="pool2")(drop(name="drop2")(x))
        x = conv_block(x, conv(16, (1, 1), name="conv5"), layers.batchnorm(name="bn5"), train)
        x = nn.relu(conv(10, (3, 3), name="conv6")(x))  # ReLU, no BatchNorm, after conv6
        x = AvgPool2d(name="gap1")(x)
        return nn.log_softmax(x.reshape(x.shape[0], -1))

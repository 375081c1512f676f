"""The Session 6 model as a Flax module, used functionally through `init` and `apply`.

Layout is NHWC with HWIO kernels (PyTorch: NCHW, OIHW). Submodules carry the PyTorch
attribute names (conv1..conv6, bn1..bn5, drop1, drop2, pool1, pool2, gap1) so the layer
table and weight conversion can be read off by name. Two PyTorch conventions are
reproduced on purpose, because Flax's defaults differ and would change what a recipe does:
BatchNorm statistics (see `BatchNorm2d`) and the initial weight distribution.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import linen as nn

from common.spec import BATCHNORM_EPS, BATCHNORM_MOMENTUM, DROPOUT_RATE
from jax_impl.fast_ops import batch_norm_train, keep_mask, make_chunked_weight_grad_conv, max_pool_2x2

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
        if train:
            # Closed-form gradient (jax_impl.fast_ops); the statistics feed the running averages only.
            y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
            mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
            if not self.is_initializing():
                count = x.size // features
                running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
                running_var.value = (1 - self.momentum) * running_var.value + self.momentum * var * (
                    bessel_correction(count)
                )
            return y
        return (x - running_mean.value) * jax.lax.rsqrt(running_var.value + self.epsilon) * scale + bias


class Dropout(nn.Dropout):
    """Element-wise dropout with nn.Dropout's interface and semantics (drop with probability
    `rate`, scale the kept values by 1 / (1 - rate), `broadcast_dims` shared), drawing its masks
    with jax_impl.fast_ops.keep_mask, which XLA fuses on CPU."""

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool | None = None, rng: jax.Array | None = None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic or self.rate == 0:
            return inputs
        keep_probability = 1.0 - self.rate
        key = self.make_rng(self.rng_collection) if rng is None else rng
        shape = tuple(1 if axis in self.broadcast_dims else size for axis, size in enumerate(inputs.shape))
        keep = keep_mask(key, shape, keep_probability)
        return jnp.where(keep, inputs / keep_probability, jnp.zeros_like(inputs))


class MaxPool2d(nn.Module):
    """2x2 max pooling, stride 2: `nn.max_pool`'s results and gradients, computed faster on CPU
    (see jax_impl.fast_ops). A module only so that it gets a row in the layer table."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return max_pool_2x2(x)


class AvgPool2d(nn.Module):
    """Average pooling over a `window` x `window` patch, stride `window`."""

    window: int = 3

    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.avg_pool(x, (self.window, self.window), strides=(self.window, self.window))


def conv_block(x: jax.Array, conv: nn.Module, batchnorm: nn.Module, train: bool) -> jax.Array:
    """conv -> ReLU -> BatchNorm: the seed's order (BatchNorm after the ReLU)."""
    return batchnorm(nn.relu(conv(x)), train)


class Net(nn.Module):
    """4,328 parameters; (N, 28, 28, 1) normalised images -> (N, 10) log-probabilities.

    `train=True` uses batch statistics, updates `batch_stats` (pass mutable=["batch_stats"])
    and applies dropout with the "dropout" random key. `weight_grad_chunk` (for CPUs, see
    jax_impl.fast_ops) changes how kernel gradients are summed, not what they are.
    """

    dropout: float = DROPOUT_RATE
    weight_grad_chunk: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = partial(nn.Conv, padding="VALID", use_bias=False, kernel_init=torch_conv_init)
        if self.weight_grad_chunk:
            conv = partial(conv, conv_general_dilated=make_chunked_weight_grad_conv(self.weight_grad_chunk))
        drop = partial(Dropout, rate=self.dropout, deterministic=not train)

        x = conv_block(x, conv(8, (3, 3), name="conv1"), BatchNorm2d(name="bn1"), train)
        x = conv_block(x, conv(16, (3, 3), name="conv2"), BatchNorm2d(name="bn2"), train)
        x = MaxPool2d(name="pool1")(drop(name="drop1")(x))
        x = conv_block(x, conv(8, (1, 1), name="conv3"), BatchNorm2d(name="bn3"), train)
        x = conv_block(x, conv(16, (3, 3), name="conv4"), BatchNorm2d(name="bn4"), train)
        x = MaxPool2d(name="pool2")(drop(name="drop2")(x))
        x = conv_block(x, conv(16, (1, 1), name="conv5"), BatchNorm2d(name="bn5"), train)
        x = nn.relu(conv(10, (3, 3), name="conv6")(x))  # ReLU, no BatchNorm, after conv6
        x = AvgPool2d(name="gap1")(x)
        return nn.log_softmax(x.reshape(x.shape[0], -1))

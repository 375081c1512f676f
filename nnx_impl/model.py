"""The Session 6 model in Flax NNX: modules that hold their own weights and statistics, as
PyTorch's do.

The same network as torch_ref.model and jax_impl.model, layer for layer and name for name
(conv1..conv6, bn1..bn5, drop1, drop2, pool1, pool2, gap1), in NHWC with HWIO kernels like the
linen twin. NNX is the closest shape to PyTorch: `Net()` builds the weights at once, `model(x)`
runs it, `model.train()` / `model.eval()` switch BatchNorm and Dropout as `nn.Module.train()` /
`.eval()` do, and training updates the BatchNorm statistics in place. Its state, split by kind
(`nnx.Param`, `nnx.BatchStat`), has exactly the linen twin's `params` and `batch_stats` trees,
so one weight mapping serves both (`variables_of`, `load_variables`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from common.spec import BATCHNORM_EPS, BATCHNORM_MOMENTUM, DROPOUT_RATE
from jax_impl.model import bessel_correction, normalize_with_batch_statistics, torch_conv_init


class BatchNorm2d(nnx.Module):
    """BatchNorm with PyTorch's semantics, which `nnx.BatchNorm` does not have: it writes the
    running-average rule with momentum 0.9 where PyTorch writes 0.1, and keeps the biased
    batch variance where PyTorch keeps the unbiased one (n / (n - 1) times it). Training
    normalises with the batch mean and biased variance and updates the running statistics in
    place; evaluation (`use_running_average`, set by `model.eval()`) normalises with them."""

    def __init__(self, features: int, *, momentum: float = BATCHNORM_MOMENTUM, epsilon: float = BATCHNORM_EPS,
                 use_running_average: bool = False, dtype: jnp.dtype = jnp.float32):
        self.scale = nnx.Param(jnp.ones((features,), dtype))
        self.bias = nnx.Param(jnp.zeros((features,), dtype))
        self.mean = nnx.BatchStat(jnp.zeros((features,), dtype))
        self.var = nnx.BatchStat(jnp.ones((features,), dtype))
        self.momentum, self.epsilon = momentum, epsilon
        self.use_running_average = use_running_average

    def __call__(self, x: jax.Array) -> jax.Array:
        scale, bias = self.scale[...], self.bias[...]
        if self.use_running_average:
            return (x - self.mean[...]) * lax.rsqrt(self.var[...] + self.epsilon) * scale + bias
        y, mean, var = self.normalize_with_batch_statistics(x, scale, bias)
        # The running averages are bookkeeping, not part of the loss: no gradient flows into them.
        unbiased = lax.stop_gradient(var) * bessel_correction(x.size // x.shape[-1])
        self.mean[...] = (1 - self.momentum) * self.mean[...] + self.momentum * lax.stop_gradient(mean)
        self.var[...] = (1 - self.momentum) * self.var[...] + self.momentum * unbiased
        return y

    def normalize_with_batch_statistics(self, x: jax.Array, scale: jax.Array,
                                        bias: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(normalised x, batch mean, biased batch variance): the linen twin's computation."""
        return normalize_with_batch_statistics(x, scale, bias, self.epsilon)


class MaxPool2d(nnx.Module):
    """2x2 max pooling, stride 2. A module only so that it has its name, as in PyTorch."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.max_pool(x, (2, 2), strides=(2, 2))


class AvgPool2d(nnx.Module):
    """Average pooling over a `window` x `window` patch, stride `window`."""

    def __init__(self, window: int = 3):
        self.window = window

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.avg_pool(x, (self.window, self.window), strides=(self.window, self.window))


@dataclass(frozen=True)
class Layers:
    """The implementation of each kind of layer `Net` is built from, as in the linen twin: the
    convolution function `nnx.Conv` calls, and the BatchNorm, Dropout and max-pool classes."""

    conv_general_dilated: Callable
    batchnorm: type[BatchNorm2d]
    dropout: type[nnx.Dropout]
    max_pool: type[MaxPool2d]


PLAIN_LAYERS = Layers(conv_general_dilated=lax.conv_general_dilated, batchnorm=BatchNorm2d, dropout=nnx.Dropout,
                      max_pool=MaxPool2d)


class Net(nnx.Module):
    """4,328 parameters; (N, 28, 28, 1) normalised images -> (N, 10) log-probabilities.

    Built in train mode, as a PyTorch module is; `model.eval()` switches to the running
    statistics and turns dropout off. `layers` swaps in other implementations of the same layers
    (nnx_impl.fast.layers); `rngs` seeds the weights and the dropout masks (default
    `nnx.Rngs(0)`, so that `Net()` alone builds it)."""

    def __init__(self, dropout: float = DROPOUT_RATE, layers: Layers = PLAIN_LAYERS, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)

        def conv(channels_in: int, channels_out: int, size: int) -> nnx.Conv:
            return nnx.Conv(channels_in, channels_out, (size, size), padding="VALID", use_bias=False,
                            kernel_init=torch_conv_init, conv_general_dilated=layers.conv_general_dilated, rngs=rngs)

        self.conv1, self.bn1 = conv(1, 8, 3), layers.batchnorm(8)
        self.conv2, self.bn2 = conv(8, 16, 3), layers.batchnorm(16)
        self.drop1, self.pool1 = layers.dropout(dropout, rngs=rngs), layers.max_pool()
        self.conv3, self.bn3 = conv(16, 8, 1), layers.batchnorm(8)
        self.conv4, self.bn4 = conv(8, 16, 3), layers.batchnorm(16)
        self.drop2, self.pool2 = layers.dropout(dropout, rngs=rngs), layers.max_pool()
        self.conv5, self.bn5 = conv(16, 16, 1), layers.batchnorm(16)
        self.conv6 = conv(16, 10, 3)
        self.gap1 = AvgPool2d(3)

    def __call__(self, x: jax.Array) -> jax.Array:
        """conv -> ReLU -> BatchNorm blocks (the seed's order), and ReLU, no BatchNorm, after conv6."""
        x = self.bn2(nnx.relu(self.conv2(self.bn1(nnx.relu(self.conv1(x))))))
        x = self.pool1(self.drop1(x))
        x = self.bn4(nnx.relu(self.conv4(self.bn3(nnx.relu(self.conv3(x))))))
        x = self.pool2(self.drop2(x))
        x = nnx.relu(self.conv6(self.bn5(nnx.relu(self.conv5(x)))))
        x = self.gap1(x)
        return nnx.log_softmax(x.reshape(x.shape[0], -1))


def variables_of(model: Net) -> dict:
    """The model's weights as the linen twin's variables {"params", "batch_stats"} (plain arrays),
    which bridge.convert maps to and from PyTorch's state_dict."""
    return {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
            "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))}


def load_variables(model: Net, variables: dict) -> None:
    """Set the model's weights in place from linen-shaped `variables` (shapes checked by NNX)."""
    for kind, tree in ((nnx.Param, variables["params"]), (nnx.BatchStat, variables["batch_stats"])):
        state = nnx.state(model, kind)
        # As JAX arrays: a NumPy array in a Variable would be updated in place, the caller's copy too.
        nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.asarray, tree))
        nnx.update(model, state)

"""The model's layers rebuilt on jax_impl.fast.ops: the same maths as the plain layers of
jax_impl.model, computed the way XLA:CPU runs fastest. `Net(layers=FAST_LAYERS)` uses them;
jax_impl.fast.choice decides when (on CPU, where they were measured faster).

Each class overrides only the computation its plain parent delegates, so parameters, variable
names, BatchNorm bookkeeping and the layer table are the plain model's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jax_impl.fast.ops import (
    CPU_WEIGHT_GRAD_CHUNK,
    batch_norm_train,
    keep_mask,
    make_chunked_weight_grad_conv,
    max_pool_2x2,
)
from jax_impl.model import BatchNorm2d, Layers, MaxPool2d


class FastBatchNorm2d(BatchNorm2d):
    """BatchNorm2d whose training-mode normalisation has the closed-form gradient."""

    def normalize_with_batch_statistics(self, x: jax.Array, scale: jax.Array,
                                        bias: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return batch_norm_train(x, scale, bias, self.epsilon)


class FastDropout(nn.Dropout):
    """nn.Dropout's interface and semantics (drop with probability `rate`, scale the kept values
    by 1 / (1 - rate), `broadcast_dims` shared), drawing its masks with ops.keep_mask, which
    XLA fuses on CPU. Its masks differ from nn.Dropout's for the same key."""

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


class FastMaxPool2d(MaxPool2d):
    """2x2 max pooling whose gradient goes through a first-maximum index."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return max_pool_2x2(x)


FAST_LAYERS = Layers(conv_general_dilated=make_chunked_weight_grad_conv(CPU_WEIGHT_GRAD_CHUNK),
                     batchnorm=FastBatchNorm2d, dropout=FastDropout, max_pool=FastMaxPool2d)

"""The NNX model's layers rebuilt on jax_impl.fast.ops: the same maths as nnx_impl.model's plain
layers, computed the way XLA:CPU runs fastest, as jax_impl.fast.layers does for linen.
`Net(layers=FAST_LAYERS)` uses them. Each class overrides only the computation its plain parent
delegates, so parameters, variable names and the BatchNorm bookkeeping are the plain model's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_impl.fast.ops import (
    CPU_WEIGHT_GRAD_CHUNK,
    batch_norm_train,
    keep_mask,
    make_chunked_weight_grad_conv,
    max_pool_2x2,
)
from nnx_impl.model import BatchNorm2d, Layers, MaxPool2d


class FastBatchNorm2d(BatchNorm2d):
    """BatchNorm2d whose training-mode normalisation has the closed-form gradient."""

    def normalize_with_batch_statistics(self, x: jax.Array, scale: jax.Array,
                                        bias: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return batch_norm_train(x, scale, bias, self.epsilon)


class FastDropout(nnx.Dropout):
    """nnx.Dropout's interface and semantics (drop with probability `rate`, scale the kept values
    by 1 / (1 - rate), `broadcast_dims` shared, its key from the layer's stream), drawing its
    masks with ops.keep_mask, which XLA fuses on CPU. Its masks differ from nnx.Dropout's."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if self.deterministic or self.rate == 0:
            return inputs
        keep_probability = 1.0 - self.rate
        stream = self.rngs[self.rng_collection] if isinstance(self.rngs, nnx.Rngs) else self.rngs  # as nnx.Dropout
        key = stream()
        shape = tuple(1 if axis in self.broadcast_dims else size for axis, size in enumerate(inputs.shape))
        keep = keep_mask(key, shape, keep_probability)
        return jnp.where(keep, inputs / keep_probability, jnp.zeros_like(inputs))


class FastMaxPool2d(MaxPool2d):
    """2x2 max pooling whose gradient goes through a first-maximum index."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return max_pool_2x2(x)


_chunked_conv = make_chunked_weight_grad_conv(CPU_WEIGHT_GRAD_CHUNK)


def fast_conv_general_dilated(*args, out_sharding=None, **kwargs) -> jax.Array:
    """The chunked-weight-gradient convolution with the signature nnx.Conv calls: NNX also passes
    the output's sharding, which is left to XLA's propagation (None unless a layer sets one)."""
    if out_sharding is not None:
        raise ValueError("the fast convolution leaves the output's sharding to XLA; build nnx.Conv without one")
    return _chunked_conv(*args, **kwargs)


FAST_LAYERS = Layers(conv_general_dilated=fast_conv_general_dilated, batchnorm=FastBatchNorm2d, dropout=FastDropout,
                     max_pool=FastMaxPool2d)

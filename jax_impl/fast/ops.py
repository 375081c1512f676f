"""The model's operations expressed so that XLA:CPU runs them fast, with unchanged maths (up to
summation order). jax_impl.fast.layers makes layers of them; jax_impl.fast.choice decides when they run.

Their derivatives are hand-written as tangent rules (`jax.custom_jvp`), which JAX transposes for
reverse mode, so every transformation works through them: `jax.grad`, `jax.jvp`, `jax.jacfwd`,
Hessian-vector products, grad-of-grad.

What each replaces, and why XLA:CPU runs the replacement faster (the timings of each are in
docs/fast_layers.md):

- 2x2 max pooling: Flax's `nn.max_pool` differentiates through XLA's select-and-scatter, which
  XLA:CPU runs slowly; here a reshape-max forward whose tangent is that of each
  window's first maximum (so its transpose places the gradient there). The gradient goes to the
  FIRST maximum of each window in row-major order, exactly as PyTorch's max_pool2d and XLA's
  select-and-scatter do (ties are common here: every ReLU zero becomes the same BatchNorm value).
- convolution weight gradients: XLA:CPU computes a kernel gradient over the whole batch as one
  convolution, slowly; summed over chunks of images it is several times faster. The forward
  pass and the input gradient are left to XLA. Only the order of the sum over examples changes.
- convolution of the single-channel input (conv1): nine shifted multiply-adds fused into one
  pass instead of XLA:CPU's convolution, several times faster (see `shifted_sum_conv`).
- dropout masks: jax.random's Threefry runs its 20 rounds in a rolled loop on CPU, which XLA
  cannot fuse. The same Threefry-2x32 hash written out in `threefry2x32` fuses with the
  comparison and the multiply.
- BatchNorm in training mode: the closed-form tangent, whose transpose is the closed-form
  gradient (two reductions and one elementwise pass), instead of differentiating the forward
  computation, which XLA turns into several more passes over the activations.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def conv_valid(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
    """Stride-1, unpadded, undilated convolution of NHWC inputs with HWIO kernels."""
    return lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_DIMENSIONS, precision=precision)


# Chunk size for the weight gradients on CPU, the fastest of the sizes tried (docs/fast_layers.md).
CPU_WEIGHT_GRAD_CHUNK = 16


@cache
def make_chunked_weight_grad_conv(chunk: int) -> Callable:
    """A drop-in `lax.conv_general_dilated` for `flax.linen.Conv` (stride 1, VALID padding, NHWC
    inputs and HWIO kernels only; it raises on anything else) whose kernel gradient is summed
    over batch chunks of `chunk` examples. `precision` reaches every convolution it runs.

    The kernel's tangent is computed chunk by chunk (and concatenated), so that its transpose,
    the kernel gradient reverse mode needs, is the sum over chunks."""

    @partial(jax.custom_jvp, nondiff_argnums=(2,))
    def chunked_weight_grad_conv(x, kernel, precision):
        return _forward_conv(x, kernel, precision)

    def tangent(precision, primals, tangents):
        (x, kernel), (x_dot, kernel_dot) = primals, tangents
        terms = []
        if not isinstance(x_dot, SymbolicZero):  # conv1's input is data: no tangent, no work
            terms.append(conv_valid(x_dot, kernel, precision))
        if not isinstance(kernel_dot, SymbolicZero):
            terms.append(jnp.concatenate([conv_valid(x[start:start + chunk], kernel_dot, precision)
                                          for start in range(0, x.shape[0], chunk)]))
        out = _forward_conv(x, kernel, precision)
        return out, sum(terms[1:], start=terms[0]) if terms else jnp.zeros_like(out)

    chunked_weight_grad_conv.defjvp(tangent, symbolic_zeros=True)

    def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                             dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                             precision=None, preferred_element_type=None):
        unsupported = [f"{name}={value!r}" for name, value, supported in (
            ("window_strides", window_strides, all(s == 1 for s in window_strides)),
            ("padding", padding, padding == "VALID" or all(tuple(p) == (0, 0) for p in padding)),
            ("lhs_dilation", lhs_dilation, lhs_dilation is None or all(d == 1 for d in lhs_dilation)),
            ("rhs_dilation", rhs_dilation, rhs_dilation is None or all(d == 1 for d in rhs_dilation)),
            ("dimension_numbers", dimension_numbers, _is_nhwc_hwio(lhs, rhs, dimension_numbers)),
            ("feature_group_count", feature_group_count, feature_group_count == 1),
            ("batch_group_count", batch_group_count, batch_group_count == 1),
            ("preferred_element_type", preferred_element_type, preferred_element_type is None),
        ) if not supported]
        if unsupported:
            raise NotImplementedError(
                "the chunked-weight-gradient convolution (jax_impl.fast.ops) computes stride-1, VALID, "
                "undilated, ungrouped NHWC x HWIO convolutions only; it does not support "
                + ", ".join(unsupported) + ". Use lax.conv_general_dilated (the plain layers) instead.")
        return chunked_weight_grad_conv(lhs, rhs, precision)

    return conv_general_dilated


def _is_nhwc_hwio(lhs: jax.Array, rhs: jax.Array, dimension_numbers) -> bool:
    if lhs.ndim != 4 or rhs.ndim != 4:
        return False
    wanted = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMENSIONS)
    return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == wanted


def _forward_conv(x: jax.Array, kernel: jax.Array, precision) -> jax.Array:
    if kernel.shape[2] == 1:
        return shifted_sum_conv(x, kernel)  # elementwise float arithmetic: full precision whatever is asked
    return conv_valid(x, kernel, precision)


def shifted_sum_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`conv_valid` for one input channel as a sum of shifted copies of the input scaled by the
    kernel's taps: one fused elementwise pass, where XLA:CPU's convolution of a single channel
    runs at a few GFLOP/s (conv1, batch 512: 9.6 ms -> 0.7 ms). Only the order of the 9-term
    sum differs from the convolution."""
    height, width = x.shape[1] - kernel.shape[0] + 1, x.shape[2] - kernel.shape[1] + 1
    terms = [x[:, i:i + height, j:j + width, :] * kernel[i, j, 0]
             for i in range(kernel.shape[0]) for j in range(kernel.shape[1])]
    return sum(terms[1:], start=terms[0])


@jax.custom_jvp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, of NHWC inputs with even height and width."""
    return _windows(x).max(axis=(2, 4))


def _windows(x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"max_pool_2x2 needs even height and width, got {x.shape}")
    return x.reshape(n, h // 2, 2, w // 2, 2, c)


def _corners(x: jax.Array) -> list[jax.Array]:
    """The four elements of every 2x2 window, in row-major order."""
    windows = _windows(x)
    return [windows[:, :, i, :, j, :] for i in (0, 1) for j in (0, 1)]


@max_pool_2x2.defjvp
def _max_pool_tangent(primals, tangents):
    """The tangent of each window's FIRST maximum in row-major order. Written as a masked sum
    over the window, so that its transpose, the gradient, is one elementwise pass: the output's
    gradient broadcast over each window and kept at that one element."""
    (x,), (x_dot,) = primals, tangents
    corners = _corners(x)
    pooled = jnp.maximum(jnp.maximum(corners[0], corners[1]), jnp.maximum(corners[2], corners[3]))
    first = jnp.where(corners[0] == pooled, 0,
                      jnp.where(corners[1] == pooled, 1, jnp.where(corners[2] == pooled, 2, 3))).astype(jnp.uint8)
    corner_of_element = np.arange(4, dtype=np.uint8).reshape(1, 1, 2, 1, 2, 1)  # row-major within the window
    receives = first[:, :, None, :, None, :] == corner_of_element
    return pooled, jnp.where(receives, _windows(x_dot), 0).sum(axis=(2, 4))


@partial(jax.custom_jvp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> tuple:
    """Training-mode batch normalisation over all axes but the last: (y, batch mean, biased
    batch variance)."""
    return _batch_norm(x, scale, bias, epsilon)[0]


def _batch_norm(x, scale, bias, epsilon):
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = jnp.square(x - mean).mean(axes)  # two passes, no cancellation (as PyTorch)
    inverse_std = lax.rsqrt(var + epsilon)
    return ((x - mean) * (inverse_std * scale) + bias, mean, var), mean, inverse_std


@batch_norm_train.defjvp
def _batch_norm_tangent(epsilon, primals, tangents):
    """The closed form: with x_hat = (x - mean) / std the normalised input and a = scale / std,
    y = x_hat * scale + bias has the tangent
        a * x' - a * mean(x') - x_hat * a * mean(x_hat * x') + x_hat * scale' + bias'.
    It is written with x itself as the only full-size factor (x_hat * c = x * c / std - mean * c
    / std for per-channel c), so that reverse mode keeps no normalised copy of x, and with the
    per-channel factors applied after the means, so that its transpose, the gradient, sums the
    output's gradient g only as sum(g) and sum(x * g): two reductions and one elementwise pass."""
    (x, scale, bias), (x_dot, scale_dot, bias_dot) = primals, tangents
    axes = tuple(range(x.ndim - 1))
    outputs, mean, inverse_std = _batch_norm(x, scale, bias, epsilon)
    a = scale * inverse_std
    mean_dot = x_dot.mean(axes)
    centred_moment_dot = (x * x_dot).mean(axes) - mean * mean_dot  # mean((x - mean) * x')
    x_hat_coefficient = inverse_std * (scale_dot - a * inverse_std * centred_moment_dot)
    y_dot = a * x_dot + x * x_hat_coefficient + (bias_dot - a * mean_dot - mean * x_hat_coefficient)
    return outputs, (y_dot, mean_dot, 2 * centred_moment_dot)


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(key: tuple[jax.Array, jax.Array], x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 block cipher (20 rounds; Salmon et al., 2011), the hash behind
    jax.random, written as plain elementwise uint32 operations so that XLA fuses it."""
    keys = (key[0], key[1], key[0] ^ key[1] ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + keys[0], x1 + keys[1]
    for block in range(5):
        for rotation in _ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = ((x1 << np.uint32(rotation)) | (x1 >> np.uint32(32 - rotation))) ^ x0
        x0 = x0 + keys[(block + 1) % 3]
        x1 = x1 + keys[(block + 2) % 3] + np.uint32(block + 1)
    return x0, x1


def keep_mask(key: jax.Array, shape: tuple[int, ...], keep_probability: float) -> jax.Array:
    """Independent Bernoulli(keep_probability) draws, one per element of `shape`: Threefry of
    the element's index under `key`, compared with keep_probability * 2**32 (so the probability
    is exact to 2**-32, finer than a float32 uniform's 2**-24).

    The mask is built as two halves of the counter range, concatenated. Left as one
    elementwise expression, XLA:CPU fuses the 20-round hash into each of the mask's consumers
    and recomputes it there: the dropout's forward and its gradient, and the max-pooling
    gradient, which evaluates it at all four elements of each window. The concatenation is
    compiled as a fusion of its own, so the hash runs once per element and the mask is stored
    as bytes (docs/fast_layers.md has the measurement)."""
    key_words = jax.random.key_data(key).astype(jnp.uint32)
    threshold = np.uint32(round(keep_probability * 2**32))
    size = int(np.prod(shape))
    halves = []
    for start, stop in ((0, size // 2), (size // 2, size)):
        counter = lax.iota(jnp.uint32, stop - start) + np.uint32(start)
        bits, _ = threefry2x32((key_words[0], key_words[1]), counter, jnp.zeros_like(counter))
        halves.append(bits < threshold)
    return jnp.concatenate(halves).reshape(shape)

"""Two layers expressed so that XLA:CPU runs their backward pass fast, with unchanged maths.

Measured on the 2-core development machine, batch 256, forward + backward (README, "Speed"):

- 2x2 max pooling: Flax's `nn.max_pool` differentiates through XLA's select-and-scatter,
  34 ms for the first pooling layer; a reshape-max forward and an explicit first-maximum
  mask backward take 4 ms. The gradient goes to the FIRST maximum of each window in row-major
  order, exactly as PyTorch's max_pool2d and XLA's select-and-scatter do (ties are common here:
  every ReLU zero becomes the same BatchNorm value).
- convolution weight gradients: XLA:CPU computes the kernel gradient of conv2 over a batch of
  256 in 35 ms; summed over chunks of 16 images it takes 4.5 ms. The forward pass and the
  input gradient are left to XLA. Only the order of the sum over examples changes.
"""

from __future__ import annotations

from functools import cache

import jax
import jax.numpy as jnp
from jax import lax

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def conv_valid(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1, unpadded, undilated convolution of NHWC inputs with HWIO kernels."""
    return lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_DIMENSIONS)


# Chunk size for the weight gradients on CPU: 16 and 32 measured equally fast, 4 markedly slower.
CPU_WEIGHT_GRAD_CHUNK = 16


def weight_grad_chunk_for(platform: str) -> int | None:
    """Chunked weight gradients help XLA:CPU only; GPUs and TPUs get the plain convolution."""
    return CPU_WEIGHT_GRAD_CHUNK if platform == "cpu" else None


@cache
def make_chunked_weight_grad_conv(chunk: int):
    """A drop-in `conv_general_dilated` for `flax.linen.Conv` (stride 1, VALID padding only)
    whose kernel gradient is summed over batch chunks of `chunk` examples."""

    @jax.custom_vjp
    def conv(x, kernel):
        return conv_valid(x, kernel)

    def forward(x, kernel):
        return conv_valid(x, kernel), (x, kernel)

    def backward(residuals, grad_out):
        x, kernel = residuals
        _, input_vjp = jax.vjp(lambda inputs: conv_valid(inputs, kernel), x)
        grad_kernel = jnp.zeros_like(kernel)
        for start in range(0, x.shape[0], chunk):
            part = slice(start, start + chunk)
            _, kernel_vjp = jax.vjp(lambda k, inputs=x[part]: conv_valid(inputs, k), kernel)
            grad_kernel = grad_kernel + kernel_vjp(grad_out[part])[0]
        return input_vjp(grad_out)[0], grad_kernel

    conv.defvjp(forward, backward)

    def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                             dimension_numbers=None, feature_group_count=1, precision=None, **unused):
        valid = padding == "VALID" or all(tuple(p) == (0, 0) for p in padding)
        plain = all(s == 1 for s in window_strides) and not any(
            d is not None and any(v != 1 for v in d) for d in (lhs_dilation, rhs_dilation))
        if not (valid and plain and feature_group_count == 1):
            raise NotImplementedError("chunked-weight-gradient convolution supports stride 1, VALID, "
                                      "no dilation and no groups only")
        return conv(lhs, rhs)

    return conv_general_dilated


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, of NHWC inputs with even height and width."""
    return _windows(x).max(axis=(2, 4))


def _windows(x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"max_pool_2x2 needs even height and width, got {x.shape}")
    return x.reshape(n, h // 2, 2, w // 2, 2, c)


def _max_pool_forward(x):
    return max_pool_2x2(x), x


def _max_pool_backward(x, grad_out):
    windows = _windows(x)
    corners = [windows[:, :, i, :, j, :] for i in (0, 1) for j in (0, 1)]  # row-major window order
    pooled = jnp.maximum(jnp.maximum(corners[0], corners[1]), jnp.maximum(corners[2], corners[3]))
    taken = jnp.zeros(pooled.shape, bool)
    grads = []
    for corner in corners:
        first = (corner == pooled) & ~taken  # only the first maximum receives the gradient
        taken = taken | first
        grads.append(jnp.where(first, grad_out, 0))
    top = jnp.stack(grads[:2], axis=3)  # (n, h/2, w/2, 2, c)
    bottom = jnp.stack(grads[2:], axis=3)
    return (jnp.stack([top, bottom], axis=2).reshape(x.shape),)


max_pool_2x2.defvjp(_max_pool_forward, _max_pool_backward)

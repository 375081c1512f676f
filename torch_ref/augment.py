"""The core's train augmentation as PyTorch tensor operations, for data resident on a GPU.

Mirrors `common.transforms.resize_crop`, `rotate` and `normalize` with the same integer tables
and the same sampling coordinates (the core's, computed in float64 on the host), so it gives
bit-identical pixels on any device: only integer gathers, products, sums and shifts happen here.
"""

from __future__ import annotations

import torch

from common.transforms import NORMALIZE_TABLE, PIXELS, WEIGHT_BITS, crop_resize_taps


def resize_crop(images: torch.Tensor, crop_size: int) -> torch.Tensor:
    """CenterCrop + bilinear resize of uint8 images (N, 28, 28), as the core computes it."""
    # The taps are cached read-only arrays; torch.tensor copies, so no tensor aliases them.
    index, weight = (torch.tensor(t, device=images.device) for t in crop_resize_taps(crop_size))
    count, height, width = images.shape
    gathered = images.reshape(count, PIXELS)[:, index.long()].int()
    rounded = ((gathered * weight).sum(-1) + (1 << (WEIGHT_BITS - 1))) >> WEIGHT_BITS
    return rounded.to(torch.uint8).reshape(count, height, width)


def rotate(images: torch.Tensor, source_index: torch.Tensor) -> torch.Tensor:
    """Gather every output pixel from the core's sampling coordinates (PIXELS = the fill)."""
    count, height, width = images.shape
    padded = torch.cat([images.reshape(count, PIXELS), images.new_zeros(count, 1)], dim=1)
    return torch.gather(padded, 1, source_index.long()).reshape(count, height, width)


def augment(images: torch.Tensor, crop: torch.Tensor, source_index: torch.Tensor, crop_size: int) -> torch.Tensor:
    """The seed's train augmentation for the given draws; uint8 in and out."""
    cropped = torch.where(crop[:, None, None], resize_crop(images, crop_size), images)
    return rotate(cropped, source_index)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 through the core's table (ToTensor + Normalize)."""
    return torch.as_tensor(NORMALIZE_TABLE, device=pixels.device)[pixels.long()]

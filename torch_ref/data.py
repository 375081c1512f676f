"""How an epoch's batches reach the device, one seed's `EpochPlan` at a time.

On a CPU the core's NumPy pipeline augments each batch; on a GPU, MNIST stays on the device as
uint8 and torch_ref.augment (bit-identical to the core) augments it there, so that only the
epoch's draws cross the bus. jax_impl.data is the same for JAX.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from common.batching import CopiedOnce, EpochPlan, train_batches
from torch_ref import augment


def to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, 28, 28) float32 NumPy images -> (N, 1, 28, 28) tensor, NCHW as the model expects."""
    return torch.from_numpy(images).unsqueeze(1).to(device)


def host_batches(plan: EpochPlan, images: np.ndarray, labels: np.ndarray,
                 device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs (B, 1, 28, 28) float32, labels (B,) int64), augmented on the host."""
    for batch in train_batches(plan, images, labels):
        yield to_tensor(batch.images, device), torch.from_numpy(batch.labels).to(device)


def resident_batches(plan: EpochPlan, images: torch.Tensor,
                     labels: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same batches from device-resident uint8 `images` and int64 `labels`."""
    device = images.device
    order = torch.as_tensor(plan.order, device=device)
    crop = torch.as_tensor(plan.crop, device=device)
    source_index = torch.as_tensor(plan.source_index().astype(np.int16), device=device)
    for positions in plan.batch_slices():
        pixels = augment.augment(images[order[positions]], crop[positions], source_index[positions], plan.crop_size)
        yield augment.normalize(pixels).unsqueeze(1), labels[order[positions]]


def resident_data(device: torch.device) -> CopiedOnce:
    """MNIST on the device as uint8 images and int64 labels, copied once. torch.tensor copies:
    the loaded MNIST arrays are read-only, and a tensor must not alias them."""
    return CopiedOnce(lambda images, labels: (torch.tensor(images, device=device),
                                              torch.tensor(labels, dtype=torch.int64, device=device)))

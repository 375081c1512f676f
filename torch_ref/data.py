"""How an epoch's batches reach the device, one seed's `EpochPlan` at a time.

On a CPU the core's NumPy pipeline augments each batch, served the PyTorch way, by a
`Dataset` over the epoch plan and a `DataLoader`; on a GPU, MNIST stays on the device as
uint8 and torch_ref.augment (bit-identical to the core) augments it there, so that only the
epoch's draws cross the bus. jax_impl.data is the same for JAX.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common.batching import CopiedOnce, EpochPlan
from torch_ref import augment


def to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, 28, 28) float32 NumPy images -> (N, 1, 28, 28) tensor, NCHW as the model expects."""
    return torch.from_numpy(images).unsqueeze(1).to(device)


class EpochBatches(Dataset):
    """One epoch of `plan` as a map-style Dataset whose item i is the plan's batch i: inputs
    (B, 1, 28, 28) float32 and labels (B,) int64, augmented on the host by the core's pipeline.
    Items are whole batches because the core augments a batch at once (vectorised), and because
    the plan, shared with JAX, already fixes the order and the batches."""

    def __init__(self, plan: EpochPlan, images: np.ndarray, labels: np.ndarray):
        self.plan, self.images, self.labels = plan, images, labels
        self.slices = plan.batch_slices()

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.plan.batch(self.images, self.labels, self.slices[index])
        return torch.from_numpy(batch.images).unsqueeze(1), torch.from_numpy(batch.labels)


def host_batches(plan: EpochPlan, images: np.ndarray, labels: np.ndarray,
                 device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's batches through a DataLoader: batch_size=None (the items are batches already),
    no shuffling (the plan is the order), and no worker processes, which on a CPU would take
    the cores the training step uses. The loader gets a generator of its own: it draws a seed
    for its workers even when it has none, and from the global stream, the one dropout draws
    from, that would shift every mask of the run."""
    loader = DataLoader(EpochBatches(plan, images, labels), batch_size=None, shuffle=False,
                        generator=torch.Generator())
    for inputs, targets in loader:
        yield inputs.to(device), targets.to(device)


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

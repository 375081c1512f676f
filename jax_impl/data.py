"""How an epoch's batches reach the device, for the two epoch functions of jax_impl.training.

Every seed of a group gets its own `EpochPlan` (its shuffle and draws); the arrays here stack
the seeds on a leading axis, so that a group of one and a group of five take the same path.
On several devices the batch axis is split over them (`sharding`); each process passes the
plans of its own part of every batch (`EpochPlan.shard`), which JAX assembles into the global
batch (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding

from common.batching import CopiedOnce, EpochPlan, train_batches


def host_batches(plans: list[EpochPlan], images: np.ndarray, labels: np.ndarray,
                 sharding: NamedSharding) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Each step's (inputs (S, B, 28, 28, 1) float32, labels (S, B) int32) for S seeds, augmented
    and normalised on the host by the core's NumPy pipeline (for `training.train_epoch`);
    `sharding` splits axis 1, the batch."""
    for batches in zip(*(train_batches(plan, images, labels) for plan in plans), strict=True):
        inputs = np.stack([batch.images[..., None] for batch in batches])
        targets = np.stack([batch.labels.astype(np.int32) for batch in batches])
        yield _global(inputs, sharding), _global(targets, sharding)


def _global(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The global array of which this process holds `local`. In one process that is the whole
    array, and device_put reaches it with less work per step than
    make_array_from_process_local_data (docs/fast_layers.md)."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local)


def scan_blocks(plans: list[EpochPlan], sharding: NamedSharding) -> Iterator[tuple[int, list[jax.Array]]]:
    """The epoch's draws for `training.scan_epoch`: (images of every process, [order, crop,
    source index]), each array shaped (S seeds, steps, batch, ...), `sharding` splitting axis 2.
    The full batches come as one block, the shorter last batch (if any) as a second, since a
    scan needs equal shapes. The sampling coordinates are the core's (float64, on the host);
    int16 halves the copy."""
    draws = [(plan.order.astype(np.int32), plan.crop, plan.source_index().astype(np.int16)) for plan in plans]
    plan = plans[0]  # all seeds share the sizes
    full = len(plan.order) // plan.batch_size * plan.batch_size
    for part in (slice(0, full), slice(full, len(plan.order))):
        count = part.stop - part.start
        if count == 0:
            continue
        batch = plan.batch_size if part.start == 0 else count
        block = [np.stack([seed[i][part].reshape(count // batch, batch, *seed[i].shape[1:]) for seed in draws])
                 for i in range(3)]
        yield count * jax.process_count(), [_global(array, sharding) for array in block]


def resident_data(sharding: NamedSharding) -> CopiedOnce:
    """MNIST on every device as uint8 images (47 MB) and int32 labels (`sharding` replicates
    them), copied once."""
    return CopiedOnce(lambda images, labels: (jax.device_put(images, sharding),
                                              jax.device_put(labels.astype(np.int32), sharding)))

"""How an epoch's batches reach the device, for the two epoch functions of jax_impl.training.

On several devices the batch axis is split over them (`sharding`); each process passes the
plan of its own part of every batch (`EpochPlan.shard`), which JAX assembles into the global
batch (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding

from common.batching import CopiedOnce, EpochPlan, train_batches


def host_batches(plan: EpochPlan, images: np.ndarray, labels: np.ndarray,
                 sharding: NamedSharding) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Each step's (inputs (B, 28, 28, 1) float32, labels (B,) int32), augmented and normalised
    on the host by the core's NumPy pipeline (for `training.train_epoch`)."""
    for batch in train_batches(plan, images, labels):
        yield global_array(batch.images[..., None], sharding), global_array(batch.labels.astype(np.int32), sharding)


def global_array(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The global array of which this process holds `local`. In one process that is the whole
    array, and device_put reaches it with less work per step than
    make_array_from_process_local_data (docs/fast_layers.md)."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local)


def scan_draws(plan: EpochPlan) -> Iterator[tuple[int, list[np.ndarray]]]:
    """The epoch's draws for `training.scan_epoch`, on the host: (images, [order, crop, source
    index]), each array shaped (steps, batch, ...). The full batches come as one block, the
    shorter last batch (if any) as a second, since a scan needs equal shapes. The sampling
    coordinates are the core's (float64); int16 halves the copy."""
    draws = (plan.order.astype(np.int32), plan.crop, plan.source_index().astype(np.int16))
    full = len(plan.order) // plan.batch_size * plan.batch_size
    for part in (slice(0, full), slice(full, len(plan.order))):
        count = part.stop - part.start
        if count == 0:
            continue
        batch = plan.batch_size if part.start == 0 else count
        yield count, [draw[part].reshape(count // batch, batch, *draw.shape[1:]) for draw in draws]


def scan_blocks(plan: EpochPlan, sharding: NamedSharding) -> Iterator[tuple[int, list[jax.Array]]]:
    """`scan_draws` on the devices, `sharding` splitting axis 1 (the batch); the images counted
    are those of every process."""
    for count, block in scan_draws(plan):
        yield count * jax.process_count(), [global_array(array, sharding) for array in block]


def resident_data(sharding: NamedSharding) -> CopiedOnce:
    """MNIST on every device as uint8 images (47 MB) and int32 labels (`sharding` replicates
    them), copied once."""
    return CopiedOnce(lambda images, labels: (jax.device_put(images, sharding),
                                              jax.device_put(labels.astype(np.int32), sharding)))

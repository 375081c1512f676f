"""Two ways to run a training epoch, chosen per backend by measurement (see README):

- `LoopEpoch`: the host augments each batch (the core's NumPy pipeline) and dispatches one
  compiled step per batch, keeping one step in flight so that the host prepares batch i + 1
  while the device computes step i. Fastest on CPU, where XLA runs a convolution inside
  `lax.scan` markedly slower than the same convolution in a standalone program.
- `ScanEpoch`: MNIST lives on the device as uint8; an epoch is one compiled `lax.scan` over
  batches that gathers, augments (jax_impl.augment, bit-identical to the core) and steps, and
  returns to the host once. The right choice on an accelerator.

Both consume the core's `EpochPlan`, so the batches, draws and results are the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import numpy as np

from common.batching import EpochPlan, train_batches
from common.progress import EpochProgress
from common.transforms import rotation_source_index
from jax_impl import augment
from jax_impl.steps import TrainState, train_step


class AheadOfTime:
    """A jitted function compiled ahead of time once per argument signature, so that the time
    spent compiling can be measured and reported apart from the time spent running."""

    def __init__(self, jitted: Callable):
        self._jitted = jitted
        self._compiled: dict[Any, Callable] = {}
        self.compile_seconds = 0.0

    def __call__(self, signature: Any, *args: Any, **static: Any) -> Any:
        """Run on `args`; `signature` must change whenever shapes or `static` values do."""
        compiled = self._compiled.get(signature)
        if compiled is None:
            started = time.perf_counter()
            compiled = self._jitted.lower(*args, **static).compile()
            self.compile_seconds += time.perf_counter() - started
            self._compiled[signature] = compiled
        return compiled(*args)


def _report(progress: EpochProgress, count: int, metrics: dict[str, jax.Array]) -> None:
    progress.update(count, float(metrics["loss_sum"].sum()), int(metrics["correct"].sum()))


class LoopEpoch:
    """One compiled step per batch, batches augmented on the host."""

    name = "loop"

    def __init__(self, device: jax.Device):
        self.device = device
        self.step = AheadOfTime(jax.jit(train_step, donate_argnums=0))

    def __call__(self, state: TrainState, key: jax.Array, plan: EpochPlan, images: np.ndarray,
                 labels: np.ndarray, progress: EpochProgress) -> TrainState:
        in_flight = None
        for batch in train_batches(plan, images, labels):
            inputs = jax.device_put(batch.images[..., None], self.device)
            targets = jax.device_put(batch.labels.astype(np.int32), self.device)
            state, metrics = self.step(len(targets), state, (inputs, targets), key)
            if in_flight:
                _report(progress, *in_flight)  # waits for the previous step only
            in_flight = (len(targets), metrics)
        if in_flight:
            _report(progress, *in_flight)
        return state


@partial(jax.jit, static_argnames="crop_size", donate_argnums=0)
def scan_steps(state: TrainState, key: jax.Array, images: jax.Array, labels: jax.Array, order: jax.Array,
               crop: jax.Array, source_index: jax.Array, crop_size: int) -> tuple[TrainState, dict]:
    """Train on batches order[i] (with their draws) for every i, entirely on the device."""

    def body(state, batch):
        positions, batch_crop, batch_source = batch
        pixels = augment.augment(images[positions], batch_crop, batch_source, crop_size)
        inputs = augment.normalize(pixels)[..., None]
        return train_step(state, (inputs, labels[positions]), key)

    return jax.lax.scan(body, state, (order, crop, source_index))


class ScanEpoch:
    """The whole epoch as one compiled scan over device-resident uint8 data."""

    name = "scan"

    def __init__(self, device: jax.Device):
        self.device = device
        self.step = AheadOfTime(scan_steps)
        self._resident: tuple[np.ndarray, jax.Array, jax.Array] | None = None

    def __call__(self, state: TrainState, key: jax.Array, plan: EpochPlan, images: np.ndarray,
                 labels: np.ndarray, progress: EpochProgress) -> TrainState:
        device_images, device_labels = self._on_device(images, labels)
        # The sampling coordinates are the core's (float64, on the host); int16 halves the copy.
        source_index = rotation_source_index(plan.angles).astype(np.int16)
        full = len(plan.order) // plan.batch_size * plan.batch_size
        for part in (slice(0, full), slice(full, len(plan.order))):
            count = part.stop - part.start
            if count == 0:
                continue
            batch = plan.batch_size if part.start == 0 else count
            shaped = [jax.device_put(a[part].reshape(count // batch, batch, *a.shape[1:]), self.device)
                      for a in (plan.order.astype(np.int32), plan.crop, source_index)]
            args = (state, key, device_images, device_labels, *shaped)
            signature = (count // batch, batch, plan.crop_size)
            state, metrics = self.step(signature, *args, crop_size=plan.crop_size)
            _report(progress, count, metrics)
        return state

    def _on_device(self, images: np.ndarray, labels: np.ndarray) -> tuple[jax.Array, jax.Array]:
        if self._resident is None or self._resident[0] is not images:
            self._resident = (images, jax.device_put(images, self.device),
                              jax.device_put(labels.astype(np.int32), self.device))
        return self._resident[1], self._resident[2]


EPOCH_RUNNERS = {"loop": LoopEpoch, "scan": ScanEpoch}


def default_epoch_runner(device: jax.Device) -> str:
    """Scan on accelerators, the step loop on CPU (the measurements are in the README)."""
    return "loop" if device.platform == "cpu" else "scan"


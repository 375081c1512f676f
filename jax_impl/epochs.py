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
from typing import Any

import jax
import numpy as np

from common.batching import EpochPlan, train_batches
from common.progress import EpochProgress
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


def _report(progresses: list[EpochProgress], count: int, metrics: dict[str, jax.Array], grouped: bool) -> None:
    """Hand each seed's summed loss and correct count to its progress (waits for the device)."""
    loss_sums, corrects = np.asarray(metrics["loss_sum"]), np.asarray(metrics["correct"])
    if not grouped:
        loss_sums, corrects = loss_sums[None], corrects[None]
    for progress, loss_sum, correct in zip(progresses, loss_sums, corrects, strict=True):
        progress.update(count, float(loss_sum.sum()), int(correct.sum()))


def seed_by_seed(step: Callable) -> Callable:
    """`step` over states stacked on a leading seed axis, one seed's slice after another in the
    same compiled program. The CPU alternative to `jax.vmap`: XLA turns a vmapped convolution
    (a batch of kernels) into a grouped convolution, which its CPU backend runs far slower
    per seed than the plain one (measured here: 2.6x for two seeds at batch 128)."""

    def stepped(state: TrainState, batch: tuple[jax.Array, jax.Array], key: jax.Array) -> tuple[TrainState, dict]:
        slices = [jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], (state, batch, key)) for i in range(key.shape[0])]
        results = [step(*arguments) for arguments in slices]
        return jax.tree_util.tree_map(lambda *leaves: jax.numpy.stack(leaves), *results)

    return stepped


class LoopEpoch:
    """One compiled step per batch, batches augmented on the host. With `grouped`, the state
    holds several seeds stacked on a leading axis; the step is vmapped over them on an
    accelerator and applied seed by seed on a CPU (`seed_by_seed`), unless `vectorised` says."""

    name = "loop"

    def __init__(self, device: jax.Device, grouped: bool = False, vectorised: bool | None = None):
        self.device, self.grouped = device, grouped
        if vectorised is None:
            vectorised = device.platform != "cpu"
        step = (jax.vmap(train_step) if vectorised else seed_by_seed(train_step)) if grouped else train_step
        self.step = AheadOfTime(jax.jit(step, donate_argnums=0))

    def __call__(self, state: TrainState, key: jax.Array, plans: list[EpochPlan], images: np.ndarray,
                 labels: np.ndarray, progresses: list[EpochProgress]) -> TrainState:
        in_flight = None
        for batches in zip(*(train_batches(plan, images, labels) for plan in plans), strict=True):
            inputs = np.stack([batch.images[..., None] for batch in batches])
            targets = np.stack([batch.labels.astype(np.int32) for batch in batches])
            if not self.grouped:
                inputs, targets = inputs[0], targets[0]
            inputs, targets = jax.device_put((inputs, targets), self.device)
            state, metrics = self.step(targets.shape, state, (inputs, targets), key)
            if in_flight:
                _report(progresses, *in_flight, self.grouped)  # waits for the previous step only
            in_flight = (len(batches[0].labels), metrics)
        if in_flight:
            _report(progresses, *in_flight, self.grouped)
        return state


def scan_steps(state: TrainState, key: jax.Array, images: jax.Array, labels: jax.Array, order: jax.Array,
               crop: jax.Array, source_index: jax.Array, crop_size: int) -> tuple[TrainState, dict]:
    """Train on batches order[i] (with their draws) for every i, entirely on the device."""

    def body(state, batch):
        positions, batch_crop, batch_source = batch
        pixels = augment.augment(images[positions], batch_crop, batch_source, crop_size)
        inputs = augment.normalize(pixels)[..., None]
        return train_step(state, (inputs, labels[positions]), key)

    return jax.lax.scan(body, state, (order, crop, source_index))


def scan_steps_grouped(state: TrainState, key: jax.Array, images: jax.Array, labels: jax.Array, order: jax.Array,
                       crop: jax.Array, source_index: jax.Array, crop_size: int) -> tuple[TrainState, dict]:
    """`scan_steps` for stacked seeds: each with its own state, key and draws, the data shared."""

    def one_seed(state, key, order, crop, source_index):
        return scan_steps(state, key, images, labels, order, crop, source_index, crop_size)

    return jax.vmap(one_seed)(state, key, order, crop, source_index)


class ScanEpoch:
    """The whole epoch as one compiled scan over device-resident uint8 data (vmapped over
    stacked seeds with `grouped`)."""

    name = "scan"

    def __init__(self, device: jax.Device, grouped: bool = False):
        self.device, self.grouped = device, grouped
        function = scan_steps_grouped if grouped else scan_steps
        self.step = AheadOfTime(jax.jit(function, static_argnames="crop_size", donate_argnums=0))
        self._resident: tuple[np.ndarray, jax.Array, jax.Array] | None = None

    def __call__(self, state: TrainState, key: jax.Array, plans: list[EpochPlan], images: np.ndarray,
                 labels: np.ndarray, progresses: list[EpochProgress]) -> TrainState:
        device_images, device_labels = self._on_device(images, labels)
        # The sampling coordinates are the core's (float64, on the host); int16 halves the copy.
        draws = [(plan.order.astype(np.int32), plan.crop, plan.source_index().astype(np.int16))
                 for plan in plans]
        plan = plans[0]  # all seeds share the sizes
        full = len(plan.order) // plan.batch_size * plan.batch_size
        for part in (slice(0, full), slice(full, len(plan.order))):
            count = part.stop - part.start
            if count == 0:
                continue
            batch = plan.batch_size if part.start == 0 else count
            shaped = [np.stack([seed_draws[i][part].reshape(count // batch, batch, *seed_draws[i].shape[1:])
                                for seed_draws in draws]) for i in range(3)]
            if not self.grouped:
                shaped = [array[0] for array in shaped]
            args = (state, key, device_images, device_labels, *jax.device_put(shaped, self.device))
            state, metrics = self.step((count // batch, batch, plan.crop_size), *args, crop_size=plan.crop_size)
            _report(progresses, count, metrics, self.grouped)
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


"""The imperative shell around jax_impl.training: what the driver (common.driver) calls.

It holds the seeds' stacked state between epochs, compiles the pure functions once, feeds them
(jax_impl.data) and reports their results; it decides nothing about how training computes.
A run of one seed is a group of one: the same state layout, the same compiled programs.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common.batching import EpochPlan
from common.framework import TrainerConfig
from common.progress import EpochProgress
from jax_impl import checkpoints, data
from jax_impl.compile_clock import compile_seconds
from jax_impl.devices import describe, limit_threads, select_device
from jax_impl.ops import layers_for, resolve_ops
from jax_impl.optim import learning_rate_schedule
from jax_impl.training import (
    Metrics,
    create_seed_states,
    eval_step,
    over_seeds,
    predict,
    scan_epoch,
    train_epoch,
    train_step,
    variables_of,
)

EPOCH_KINDS = ("loop", "scan")  # training.train_epoch, training.scan_epoch


def default_epoch(device: jax.Device) -> str:
    """The step loop on CPU, one scan per epoch on accelerators (measurements in the README)."""
    return "loop" if device.platform == "cpu" else "scan"


class JaxSeedGroup:
    """Seeds trained together, their states stacked on a leading axis. Seed s starts from the
    weights and dropout key a run of seed s alone would, and sees that run's batches, so it
    follows the same trajectory in any group. Several seeds are vmapped on an accelerator and
    applied seed by seed on a CPU (see `training.over_seeds`)."""

    def __init__(self, config: TrainerConfig, seeds: list[int], epoch: str | None = None):
        limit_threads(config.threads)
        self.device = select_device(config.device)
        self.ops = resolve_ops(config.ops, self.device.platform)
        self.seeds = seeds
        self.schedule = learning_rate_schedule(config.recipe, config.steps_per_epoch)
        states, keys = create_seed_states(seeds, config.recipe, config.steps_per_epoch, layers_for(self.ops))
        self.state, self.keys = jax.device_put((states, keys), self.device)
        self.epoch = epoch or default_epoch(self.device)
        if self.epoch not in EPOCH_KINDS:
            raise ValueError(f"unknown epoch {self.epoch!r}: expected one of {', '.join(EPOCH_KINDS)}")
        vectorised = self.device.platform != "cpu" and len(seeds) > 1
        self.step = jax.jit(over_seeds(train_step, (0, 0, 0), vectorised), donate_argnums=0)
        self.scan = jax.jit(functools.partial(_scan_epochs, vectorised), static_argnames="crop_size",
                            donate_argnums=0)
        self.evaluate = jax.jit(over_seeds(functools.partial(eval_step, self.state.apply_fn), (0, None), vectorised))
        self.resident = data.resident_data(self.device)

    def describe(self) -> dict[str, Any]:
        return {**describe(self.device, self.ops), "epoch": self.epoch, "seeds in one program": len(self.seeds)}

    def learning_rate(self) -> float:
        return float(self.schedule(int(self.state.step[0])))

    def compile_seconds(self) -> float:
        return compile_seconds()

    def train_epoch(self, plans: list[EpochPlan], images: np.ndarray, labels: np.ndarray,
                    progresses: list[EpochProgress]) -> None:
        def report(count: int, metrics: Metrics) -> None:
            """Hand each seed's summed loss and correct count to its progress (waits for the device)."""
            for progress, loss_sum, correct in zip(progresses, np.asarray(metrics["loss_sum"]),
                                                   np.asarray(metrics["correct"]), strict=True):
                progress.update(count, float(loss_sum.sum()), int(correct.sum()))

        if self.epoch == "loop":
            batches = data.host_batches(plans, images, labels, self.device)
            self.state = train_epoch(self.step, self.state, self.keys, batches, report)
            return
        device_images, device_labels = self.resident(images, labels)
        for count, draws in data.scan_blocks(plans, self.device):
            self.state, metrics = self.scan(self.state, self.keys, device_images, device_labels, *draws,
                                            crop_size=plans[0].crop_size)
            report(count, metrics)

    def predict(self, images: np.ndarray, batch_size: int) -> list[np.ndarray]:
        return list(predict(self.evaluate, variables_of(self.state), images, batch_size, self.device,
                            seed_axis=True))

    def restore(self, index: int, payload: dict) -> None:
        """Seed `index` continues from a checkpoint's payload (see checkpoints.read_checkpoint)."""
        saved = checkpoints.restored(self._seed(index, self.state), payload["state"], "the checkpoint")
        self.state = jax.tree_util.tree_map(lambda stacked, leaf: stacked.at[index].set(leaf), self.state,
                                            jax.device_put(saved, self.device))

    def is_finite(self, index: int) -> bool:
        """Whether every weight and BatchNorm statistic of seed `index` is a finite number."""
        leaves = jax.tree_util.tree_leaves(self._seed(index, variables_of(self.state)))
        return all(bool(jnp.isfinite(leaf).all()) for leaf in leaves)

    def checkpoint_bytes(self, index: int, meta: dict) -> bytes:
        return checkpoints.checkpoint_bytes(self._seed(index, self.state), meta)

    def model_bytes(self, index: int) -> bytes:
        return checkpoints.model_bytes(self._seed(index, variables_of(self.state)))

    @staticmethod
    def _seed(index: int, tree: Any) -> Any:
        return jax.tree_util.tree_map(lambda leaf: leaf[index], tree)


def _scan_epochs(vectorised: bool, state, keys, images, labels, order, crop, source_index, *, crop_size: int):
    """`training.scan_epoch` of every seed: its own state, key and draws, the data shared."""
    one_seed = functools.partial(scan_epoch, crop_size=crop_size)
    return over_seeds(one_seed, (0, 0, None, None, 0, 0, 0), vectorised)(
        state, keys, images, labels, order, crop, source_index)

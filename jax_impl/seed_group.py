"""The imperative shell around jax_impl.training: what the driver (common.driver) calls.

It holds the seeds' stacked state between epochs, compiles the pure functions once, feeds them
(jax_impl.data) and reports their results; it decides nothing about how training computes.
A run of one seed is a group of one: the same state layout, the same compiled programs. A run
on one device is a mesh of one: on N devices (jax_impl.devices) the state is replicated and
every batch split over them, and the same step computes what one device computes, BatchNorm
included: its batch statistics are means over the global batch (XLA inserts the all-reduce),
the semantics of PyTorch's SyncBatchNorm.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from common.batching import EpochPlan, check_even_shards
from common.framework import TrainerConfig
from common.progress import EpochProgress
from jax_impl import checkpoints, data
from jax_impl.devices import data_mesh, describe, limit_threads, put_replicated, replicated, select_devices, split_along
from jax_impl.fast.choice import layers_for, resolve_ops
from jax_impl.fast.compile_clock import compile_seconds
from jax_impl.optim import learning_rate_schedule
from jax_impl.recalibration import batch_statistics, recalibrated_batch_stats, statistics_model
from jax_impl.training import (
    Metrics,
    create_seed_states,
    eval_step,
    evaluated_variables_of,
    over_seeds,
    predict,
    scan_epoch,
    swa_step,
    train_epoch,
    train_step,
    variables_of,
)

EPOCH_KINDS = ("loop", "scan")  # training.train_epoch, training.scan_epoch


def default_epoch(platform: str) -> str:
    """The step loop on CPU, one scan per epoch on accelerators (measurements in docs/speed.md)."""
    return "loop" if platform == "cpu" else "scan"


class JaxSeedGroup:
    """Seeds trained together, their states stacked on a leading axis. Seed s starts from the
    weights and dropout key a run of seed s alone would, and sees that run's batches, so it
    follows the same trajectory in any group. Several seeds are vmapped on an accelerator and
    applied seed by seed on a CPU (see `training.over_seeds`)."""

    def __init__(self, config: TrainerConfig, seeds: list[int], epoch: str | None = None):
        limit_threads(config.threads)
        self.devices = select_devices(config.device, config.devices)
        if len(self.devices) > 1:
            check_even_shards(config.recipe.batch_size, config.epoch_images, len(self.devices))
        self.platform = self.devices[0].platform
        self.processes = config.processes
        self.mesh = data_mesh(self.devices)
        self.ops = resolve_ops(config.ops, self.platform)
        self.seeds = seeds
        self.schedule = learning_rate_schedule(config.recipe, config.steps_per_epoch)
        states, keys = create_seed_states(seeds, config.recipe, config.steps_per_epoch, layers_for(self.ops))
        whole = replicated(self.mesh)
        self.state, self.keys = put_replicated((states, keys), whole)
        self.epoch = epoch or default_epoch(self.platform)
        if self.epoch not in EPOCH_KINDS:
            raise ValueError(f"unknown epoch {self.epoch!r}: expected one of {', '.join(EPOCH_KINDS)}")
        vectorised = self.platform != "cpu" and len(seeds) > 1
        self.step = jax.jit(over_seeds(train_step, (0, 0, 0), vectorised), donate_argnums=0, out_shardings=whole)
        self.scan = jax.jit(functools.partial(_scan_epochs, vectorised), static_argnames="crop_size",
                            donate_argnums=0, out_shardings=whole)
        self.evaluate = jax.jit(over_seeds(functools.partial(eval_step, self.state.apply_fn), (0, None), vectorised),
                                out_shardings=whole)
        statistics = functools.partial(batch_statistics, statistics_model(layers_for(self.ops)))
        self.swa = jax.jit(over_seeds(swa_step, (0,), vectorised), donate_argnums=0, out_shardings=whole)
        self.statistics = jax.jit(over_seeds(statistics, (0, None), vectorised), out_shardings=whole)
        self.resident = data.resident_data(whole)

    def describe(self) -> dict[str, Any]:
        return {**describe(self.devices, self.ops), "epoch": self.epoch, "seeds in one program": len(self.seeds)}

    def learning_rate(self) -> float:
        return float(self.schedule(int(jax.device_get(self.state.step)[0])))

    def compile_seconds(self) -> float:
        return compile_seconds()

    def train_epoch(self, plans: list[EpochPlan], images: np.ndarray, labels: np.ndarray,
                    progresses: list[EpochProgress]) -> None:
        def report(count: int, metrics: Metrics) -> None:
            """Hand each seed's summed loss and correct count to its progress (waits for the device)."""
            for progress, loss_sum, correct in zip(progresses, np.asarray(metrics["loss_sum"]),
                                                   np.asarray(metrics["correct"]), strict=True):
                progress.update(count, float(loss_sum.sum()), int(correct.sum()))

        processes = self.processes
        plans = [plan.shard(processes.index, processes.count) for plan in plans] if processes.count > 1 else plans
        if self.epoch == "loop":
            batches = data.host_batches(plans, images, labels, split_along(self.mesh, 1))
            self.state = train_epoch(self.step, self.state, self.keys, batches, report)
            return
        device_images, device_labels = self.resident(images, labels)
        for count, draws in data.scan_blocks(plans, split_along(self.mesh, 2)):
            self.state, metrics = self.scan(self.state, self.keys, device_images, device_labels, *draws,
                                            crop_size=plans[0].crop_size)
            report(count, metrics)

    def average_weights(self) -> None:
        self.state = self.swa(self.state)

    def recalibrate_batchnorm(self, images: np.ndarray, batch_size: int) -> None:
        """Recompute the statistics of the weights evaluated: the average's, once it holds any."""
        batch_stats = recalibrated_batch_stats(self.statistics, evaluated_variables_of(self.state), images,
                                               batch_size, split_along(self.mesh, 0))
        averaged = self.state.averaged
        if averaged is not None and int(jax.device_get(averaged.count)[0]) > 0:  # every seed's count is the same
            variables = {**averaged.variables, "batch_stats": batch_stats}
            self.state = self.state.replace(averaged=averaged.replace(variables=variables))
        else:
            self.state = self.state.replace(batch_stats=batch_stats)

    def predict(self, images: np.ndarray, batch_size: int) -> list[np.ndarray]:
        return list(predict(self.evaluate, evaluated_variables_of(self.state), images, batch_size,
                            split_along(self.mesh, 0), seed_axis=True))

    def restore(self, index: int, payload: dict) -> None:
        """Seed `index` continues from a checkpoint's payload (see checkpoints.read_checkpoint)."""
        state = jax.device_get(self.state)
        saved = dict(payload["state"])
        saved.setdefault("averaged", None)  # a checkpoint without the field keeps no average
        saved = checkpoints.restored(self._seed(index, state), saved, "the checkpoint")
        state = jax.tree_util.tree_map(lambda stacked, leaf: _replaced(stacked, index, leaf), state, saved)
        self.state = put_replicated(state, replicated(self.mesh))

    def is_finite(self, index: int) -> bool:
        """Whether every weight and BatchNorm statistic of seed `index`, trained and averaged, is finite."""
        leaves = jax.tree_util.tree_leaves(self._seed(index, (variables_of(self.state), self.state.averaged)))
        return all(bool(np.isfinite(leaf).all()) for leaf in leaves)

    def checkpoint_bytes(self, index: int, meta: dict) -> bytes:
        return checkpoints.checkpoint_bytes(self._seed(index, self.state), meta)

    def model_bytes(self, index: int) -> bytes:
        return checkpoints.model_bytes(self._seed(index, evaluated_variables_of(self.state)))

    @staticmethod
    def _seed(index: int, tree: Any) -> Any:
        """Seed `index`'s part of a stacked state, as NumPy arrays. Read from this process's own
        copy of the replicated state, so that process 0 may do it alone."""
        return jax.tree_util.tree_map(lambda leaf: jax.device_get(leaf)[index], tree)


def _replaced(stacked: np.ndarray, index: int, leaf: Any) -> np.ndarray:
    """`stacked` with seed `index`'s entry set to `leaf`."""
    stacked = np.array(stacked)
    stacked[index] = leaf
    return stacked


def _scan_epochs(vectorised: bool, state, keys, images, labels, order, crop, source_index, *, crop_size: int):
    """`training.scan_epoch` of every seed: its own state, key and draws, the data shared."""
    one_seed = functools.partial(scan_epoch, crop_size=crop_size)
    return over_seeds(one_seed, (0, 0, None, None, 0, 0, 0), vectorised)(
        state, keys, images, labels, order, crop, source_index)

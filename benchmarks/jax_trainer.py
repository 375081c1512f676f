"""jax_impl.train's epoch, and jax_impl.seeds' vmapped one, as objects a benchmark can time.

The trainers run whole runs: files, an evaluation after every epoch. A benchmark times epochs
of plans of its own choosing on a state that lives between them. These classes build that
state, its compiled step and its batches line for line as jax_impl.train.train (one seed) and
jax_impl.seeds.train_vmapped (seeds stacked, one program) build theirs, so that what is timed
is what a run spends; they write nothing and decide nothing.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from common.batching import EpochPlan, check_even_shards
from common.processes import SINGLE_PROCESS, Processes
from common.progress import EpochProgress
from common.settings import RunSettings
from jax_impl import data
from jax_impl.devices import describe, limit_threads, select_devices
from jax_impl.distributed import data_mesh, put_replicated, replicated, split_along
from jax_impl.fast.choice import layers_for, resolve_ops
from jax_impl.fast.heaps import step_compiler_options
from jax_impl.model import Net
from jax_impl.optim import learning_rate_schedule, make_optimizer
from jax_impl.recalibration import batch_statistics, recalibrate_batchnorm, statistics_model
from jax_impl.seeds import create_seed_states, stacked_batches
from jax_impl.train import default_epoch
from jax_impl.training import (
    create_train_state,
    eval_step,
    evaluated_variables_of,
    predict,
    scan_epoch,
    swa_step,
    train_epoch,
    train_step,
)


class _Placed:
    """What both trainers build before any state exists, as they build it: threads, devices
    (every batch split evenly over them), layers, mesh, the model, and the optimiser whose
    schedule counts an epoch as `first_plan`'s steps. Each subclass keeps its training state
    in `self.state`."""

    def __init__(self, settings: RunSettings, first_plan: EpochPlan):
        limit_threads(settings.threads)
        self.devices = select_devices(settings.device, settings.devices)
        if len(self.devices) > 1:
            check_even_shards(settings.recipe.batch_size, len(first_plan.order), len(self.devices))
        self.platform = self.devices[0].platform
        self.ops = resolve_ops(settings.ops, self.platform)
        self.layers = layers_for(self.ops)
        self.mesh = data_mesh(self.devices)
        self.whole = replicated(self.mesh)
        self.model = Net(dropout=settings.recipe.dropout, layers=self.layers)
        schedule = learning_rate_schedule(settings.recipe, len(first_plan.batch_slices()))
        self.tx = make_optimizer(settings.recipe, schedule)

    def synchronize(self) -> None:
        """Wait for the queued work on the state, so that a clock read next comes after it."""
        jax.block_until_ready(self.state)

    def device_peak_mb(self) -> float | None:
        """The accelerator's peak memory so far (None on a CPU, whose memory is the process's)."""
        if self.platform == "cpu":
            return None
        return self.devices[0].memory_stats().get("peak_bytes_in_use", 0) / 2**20


class JaxTrainer(_Placed):
    """settings.seed as jax_impl.train.train trains it: the step loop or the scan epoch
    (`epoch_kind`, default the platform's), the state replicated over the devices."""

    def __init__(self, settings: RunSettings, first_plan: EpochPlan, processes: Processes = SINGLE_PROCESS,
                 epoch_kind: str | None = None):
        super().__init__(settings, first_plan)
        self.processes = processes
        self.epoch_kind = epoch_kind or default_epoch(self.platform)
        self.state, self.key = put_replicated(create_train_state(self.model, self.tx, settings.seed, settings.recipe),
                                              self.whole)
        self.step_options = step_compiler_options(self.platform, settings.recipe.batch_size) \
            if self.epoch_kind == "loop" else {}
        self.step = jax.jit(train_step, donate_argnums=0, out_shardings=self.whole, compiler_options=self.step_options)
        self.scan = jax.jit(scan_epoch, static_argnames="crop_size", donate_argnums=0, out_shardings=self.whole)
        self.evaluate = jax.jit(functools.partial(eval_step, self.model.apply), out_shardings=self.whole)
        self.average = jax.jit(swa_step, donate_argnums=0, out_shardings=self.whole)
        self.statistics = jax.jit(functools.partial(batch_statistics, statistics_model(self.layers)),
                                  out_shardings=self.whole)
        self.resident = data.resident_data(self.whole)

    def describe(self) -> dict:
        """The facts the trainer records in config.json."""
        return {**describe(self.devices, self.ops, self.step_options), "epoch": self.epoch_kind}

    def train_epoch(self, plan: EpochPlan, images: np.ndarray, labels: np.ndarray) -> None:
        """Every batch of `plan` (this process's part of each), each step's metrics read as the trainer reads them."""
        progress = EpochProgress(1, 1, len(plan.order), enabled=False)

        def report(count: int, metrics: dict) -> None:
            progress.update(count, float(np.sum(metrics["loss_sum"])), int(np.sum(metrics["correct"])))

        processes = self.processes
        own_part = plan.shard(processes.index, processes.count) if processes.count > 1 else plan
        if self.epoch_kind == "loop":
            batches = data.host_batches(own_part, images, labels, split_along(self.mesh, 0))
            self.state = train_epoch(self.step, self.state, self.key, batches, report)
            return
        device_images, device_labels = self.resident(images, labels)
        for count, draws in data.scan_blocks(own_part, split_along(self.mesh, 1)):
            self.state, metrics = self.scan(self.state, self.key, device_images, device_labels, *draws,
                                            crop_size=plan.crop_size)
            report(count, metrics)

    def average_weights(self) -> None:
        """The weights taken into their SWA average (end of an epoch)."""
        self.state = self.average(self.state)

    def recalibrate(self, images: np.ndarray, batch_size: int) -> None:
        """The evaluated weights' BatchNorm statistics recomputed over normalised `images`."""
        self.state = recalibrate_batchnorm(self.state, self.statistics, images, batch_size, split_along(self.mesh, 0))

    def predict(self, images: np.ndarray, batch_size: int) -> list[np.ndarray]:
        """The seed's log-probabilities of normalised `images`, as a list of one."""
        return [predict(self.evaluate, evaluated_variables_of(self.state), images, batch_size,
                        split_along(self.mesh, 0))]


class JaxSeedsTrainer(_Placed):
    """`seeds` as jax_impl.seeds.train_vmapped trains them: states stacked, one vmapped step."""

    def __init__(self, settings: RunSettings, first_plan: EpochPlan, seeds: tuple[int, ...]):
        super().__init__(settings, first_plan)
        self.state, self.keys = put_replicated(create_seed_states(self.model, self.tx, seeds, settings.recipe),
                                               self.whole)
        self.step = jax.jit(jax.vmap(train_step), donate_argnums=0, out_shardings=self.whole)
        self.evaluate = jax.jit(jax.vmap(functools.partial(eval_step, self.model.apply), in_axes=(0, None)),
                                out_shardings=self.whole)
        self.seeds = seeds

    def train_epoch(self, plan: EpochPlan, images: np.ndarray, labels: np.ndarray) -> None:
        """Every batch of `plan`, for every seed at once; each seed's metrics read into its progress."""
        progresses = [EpochProgress(1, 1, len(plan.order), enabled=False) for _ in self.seeds]

        def report(count: int, metrics: dict) -> None:
            for progress, loss_sum, correct in zip(progresses, np.asarray(metrics["loss_sum"]),
                                                   np.asarray(metrics["correct"]), strict=True):
                progress.update(count, float(loss_sum.sum()), int(correct.sum()))

        batches = stacked_batches([plan] * len(self.seeds), images, labels, split_along(self.mesh, 1))
        self.state = train_epoch(self.step, self.state, self.keys, batches, report)

    def predict(self, images: np.ndarray, batch_size: int) -> list[np.ndarray]:
        """Each seed's log-probabilities of normalised `images`."""
        return list(predict(self.evaluate, evaluated_variables_of(self.state), images, batch_size,
                            split_along(self.mesh, 0)))

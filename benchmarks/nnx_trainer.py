"""nnx_impl.train's epoch as an object a benchmark can time, in two forms of the same step.

`nnx.jit` is the form nnx_impl.train runs: `train_step(model, optimizer, ...)` compiled by
`nnx.jit`, which walks the model's object graph in Python at every call. "split/merge" is the
functional form of Flax's performance guide: the model and optimiser split once into a static
graph definition and a pytree of arrays, and a `jax.jit` step that merges them, runs the very
same `train_step` body and returns the new arrays, so that no Python walks the graph per step.
The model, optimiser and batches are built line for line as nnx_impl.train builds them.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from common.batching import EpochPlan, check_even_shards
from common.progress import EpochProgress
from common.settings import RunSettings
from jax_impl import data
from jax_impl.devices import describe, limit_threads, select_devices
from jax_impl.distributed import data_mesh, put_replicated, replicated, split_along
from jax_impl.fast.choice import resolve_ops
from jax_impl.fast.heaps import step_compiler_options
from jax_impl.optim import learning_rate_schedule, make_optimizer
from jax_impl.training import Metrics
from nnx_impl.checkpoints import NAMES
from nnx_impl.fast.choice import layers_for
from nnx_impl.model import Net
from nnx_impl.training import create_train_state, predict, train_epoch, train_step

FORMS = ("nnx.jit", "split/merge")


class NnxTrainer:
    """settings.seed as nnx_impl.train.train trains it, its steps in `form` (one of FORMS)."""

    def __init__(self, settings: RunSettings, first_plan: EpochPlan, form: str = "nnx.jit"):
        if form not in FORMS:
            raise ValueError(f"unknown form {form!r}: expected one of {', '.join(FORMS)}")
        recipe = settings.recipe
        limit_threads(settings.threads)
        self.devices = select_devices(settings.device, settings.devices)
        if len(self.devices) > 1:
            check_even_shards(recipe.batch_size, len(first_plan.order), len(self.devices))
        self.platform = self.devices[0].platform
        self.ops = resolve_ops(settings.ops, self.platform)
        self.mesh = data_mesh(self.devices)
        whole = replicated(self.mesh)
        init_key, dropout_key = jax.random.split(jax.random.key(settings.seed))
        self.model = Net(dropout=recipe.dropout, layers=layers_for(self.ops), rngs=nnx.Rngs(init_key))
        schedule = learning_rate_schedule(recipe, len(first_plan.batch_slices()))
        self.optimizer = create_train_state(self.model, make_optimizer(recipe, schedule))
        for placed in (self.model, self.optimizer):
            nnx.update(placed, put_replicated(nnx.state(placed), whole))
        self.key = put_replicated(dropout_key, whole)
        self.form, self.label_smoothing = form, recipe.label_smoothing
        self.graphdef, self.state = nnx.split((self.model, self.optimizer))
        # nnx.jit takes no compiler options; the split/merge form's jax.jit takes the linen step's.
        self.step_options = step_compiler_options(self.platform, recipe.batch_size) if form == "split/merge" else {}
        self.step = jax.jit(functools.partial(_merged_step, self.graphdef), donate_argnums=0,
                            static_argnames="label_smoothing", compiler_options=self.step_options)

    def describe(self) -> dict:
        """The facts the trainer records in config.json, and the step's form."""
        return {**describe(self.devices, self.ops, self.step_options), "framework": NAMES.title, "epoch": "loop",
                "form": self.form}

    def train_epoch(self, plan: EpochPlan, images: np.ndarray, labels: np.ndarray) -> None:
        """Every batch of `plan`, each step's metrics read as the trainer reads them."""
        progress = EpochProgress(1, 1, len(plan.order), enabled=False)

        def report(count: int, metrics: Metrics) -> None:
            progress.update(count, float(np.sum(metrics["loss_sum"])), int(np.sum(metrics["correct"])))

        batches = data.host_batches(plan, images, labels, split_along(self.mesh, 0))
        if self.form == "nnx.jit":
            train_epoch(self.model, self.optimizer, self.key, batches, report, self.label_smoothing)
            return
        batches = iter(batches)
        batch, in_flight = next(batches, None), None
        while batch is not None:  # the host one batch ahead, as nnx_impl.training.train_epoch
            self.state, metrics = self.step(self.state, batch, self.key, label_smoothing=self.label_smoothing)
            count, batch = batch[1].shape[-1], next(batches, None)
            if in_flight:
                report(*in_flight)
            in_flight = (count, metrics)
        if in_flight:
            report(*in_flight)
        nnx.update((self.model, self.optimizer), self.state)

    def synchronize(self) -> None:
        """Wait for the queued work, so that a clock read next comes after it."""
        jax.block_until_ready(nnx.state(self.model) if self.form == "nnx.jit" else self.state)

    def device_peak_mb(self) -> float | None:
        """The accelerator's peak memory so far (None on a CPU, whose memory is the process's)."""
        if self.platform == "cpu":
            return None
        return self.devices[0].memory_stats().get("peak_bytes_in_use", 0) / 2**20

    def predict(self, images: np.ndarray, batch_size: int) -> list[np.ndarray]:
        """The seed's log-probabilities of normalised `images`, as a list of one."""
        return [predict(self.model, images, batch_size, split_along(self.mesh, 0))]


def _merged_step(graphdef: nnx.GraphDef, state: nnx.State, batch: tuple[jax.Array, jax.Array], key: jax.Array,
                 label_smoothing: float) -> tuple[nnx.State, Metrics]:
    """train_step's body on the model and optimiser merged from `state`; their new state out."""
    model, optimizer = nnx.merge(graphdef, state)
    metrics = train_step.__wrapped__(model, optimizer, batch, key, label_smoothing)
    return nnx.state((model, optimizer)), metrics

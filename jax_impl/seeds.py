"""Several seeds of one recipe (--seeds), each into <out>/seed<S>, then their summary.

On a CPU the seeds train one after another, each a run of jax_impl.train: XLA turns a vmapped
convolution (a batch of kernels) into a grouped convolution, which its CPU backend runs far
slower per seed than the plain one (docs/fast_layers.md). On an accelerator they train as one
program: their states stacked on a leading axis and every function of jax_impl.training
`jax.vmap`ped over it. Seed s starts from the weights and dropout key of a run of seed s alone
and sees that run's batches, so it follows the same trajectory either way.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from common.batching import EpochPlan, check_even_shards, train_batches
from common.metrics import EpochRecord, evaluate_log_probs
from common.processes import Processes
from common.recipes import Recipe
from common.run import (
    announce,
    epoch_count,
    epoch_plan,
    epoch_progress,
    evaluation_set,
    load_data,
    seed_runs,
    train_in_turn,
    write_seeds_summary,
)
from common.run_log import RunLog, refuse_non_finite
from common.settings import RunSettings
from common.transforms import normalize
from jax_impl import data
from jax_impl.checkpoints import NAMES, checkpoint_bytes, model_bytes
from jax_impl.devices import describe, limit_threads, select_devices
from jax_impl.distributed import data_mesh, put_replicated, replicated, split_along
from jax_impl.fast.choice import layers_for, resolve_ops
from jax_impl.fast.compile_clock import compile_seconds
from jax_impl.model import Net
from jax_impl.optim import learning_rate_schedule, make_optimizer
from jax_impl.recalibration import batch_statistics, recalibrate_batchnorm, statistics_model
from jax_impl.training import (
    TrainState,
    create_train_state,
    eval_step,
    evaluated_variables_of,
    is_finite,
    predict,
    swa_step,
    train_epoch,
    train_step,
)

Train = Callable[[RunSettings, Processes], list[EpochRecord]]


def train_seeds(settings: RunSettings, seeds: tuple[int, ...], processes: Processes,
                train: Train) -> list[list[EpochRecord]]:
    """Train every seed: in turn through `train` (jax_impl.train's) on a CPU, vmapped elsewhere."""
    limit_threads(settings.threads)
    if select_devices(settings.device, settings.devices)[0].platform == "cpu":
        return train_in_turn(settings, seeds, processes, train)
    return train_vmapped(settings, seeds, processes)


def create_seed_states(model: Net, tx: optax.GradientTransformation, seeds: tuple[int, ...],
                       recipe: Recipe) -> tuple[TrainState, jax.Array]:
    """(states, dropout keys) of `seeds`, each created as a run of its seed alone creates it,
    stacked on a leading axis (the static fields, the same for every seed, are the first's)."""
    created = [create_train_state(model, tx, seed, recipe) for seed in seeds]
    return _stacked([state for state, _ in created]), jnp.stack([key for _, key in created])


def _stacked(trees: list[Any]) -> Any:
    """Trees of one structure as one tree of stacked leaves (static fields: the first tree's)."""
    structure = jax.tree_util.tree_structure(trees[0])
    leaves = zip(*(jax.tree_util.tree_leaves(tree) for tree in trees), strict=True)
    return jax.tree_util.tree_unflatten(structure, [jnp.stack(leaf) for leaf in leaves])


def stacked_batches(plans: list[EpochPlan], images: np.ndarray, labels: np.ndarray,
                    sharding: NamedSharding) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Each step's (inputs (S, B, 28, 28, 1), labels (S, B)) of S seeds, each seed's batch from
    its own plan; `sharding` splits axis 1, the batch."""
    for batches in zip(*(train_batches(plan, images, labels) for plan in plans), strict=True):
        inputs = np.stack([batch.images[..., None] for batch in batches])
        targets = np.stack([batch.labels.astype(np.int32) for batch in batches])
        yield data.global_array(inputs, sharding), data.global_array(targets, sharding)


def train_vmapped(settings: RunSettings, seeds: tuple[int, ...], processes: Processes) -> list[list[EpochRecord]]:
    """The seeds as one compiled program: jax_impl.train's loop over stacked states."""
    runs = seed_runs(settings, seeds, processes)
    recipe = settings.recipe
    mnist = load_data(settings, processes)
    evaluated_on = evaluation_set(settings, mnist)
    epochs = epoch_count(settings)
    first_plan = epoch_plan(settings, mnist, 1)

    devices = select_devices(settings.device, settings.devices)
    if len(devices) > 1:
        check_even_shards(recipe.batch_size, len(first_plan.order), len(devices))
    ops = resolve_ops(settings.ops, devices[0].platform)
    layers = layers_for(ops)
    mesh = data_mesh(devices)
    whole = replicated(mesh)

    model = Net(dropout=recipe.dropout, layers=layers)
    schedule = learning_rate_schedule(recipe, len(first_plan.batch_slices()))
    states, keys = put_replicated(create_seed_states(model, make_optimizer(recipe, schedule), seeds, recipe), whole)
    step = jax.jit(jax.vmap(train_step), donate_argnums=0, out_shardings=whole)
    evaluate = jax.jit(jax.vmap(functools.partial(eval_step, model.apply), in_axes=(0, None)),
                       out_shardings=whole)
    average = jax.jit(jax.vmap(swa_step), donate_argnums=0, out_shardings=whole)
    statistics = jax.jit(jax.vmap(functools.partial(batch_statistics, statistics_model(layers)), in_axes=(0, None)),
                         out_shardings=whole)
    check_finite = jax.jit(jax.vmap(is_finite))

    # The vmapped step keeps XLA's defaults: jax_impl.fast.heaps is for the step loop's step.
    facts = {**describe(devices, ops, {}), "seeds in one program": len(seeds)}
    logs = [RunLog(NAMES, run, facts, evaluated_on) for run in runs] if processes.is_main else []
    if processes.is_main:
        announce(NAMES, settings, facts, 0, epochs, seeds)

    evaluations = []
    for epoch in range(1, epochs + 1):
        plans = [epoch_plan(run, mnist, epoch) for run in runs]
        for log, plan in zip(logs, plans, strict=True):
            if epoch == 1:
                log.plot_samples(plan, mnist)
        lr, compiled_before = float(schedule(int(jax.device_get(states.step)[0]))), compile_seconds()
        progresses = [epoch_progress(epoch, epochs, plan, shown=processes.is_main and index == 0)
                      for index, plan in enumerate(plans)]

        def report(images: int, metrics: dict, progresses=progresses) -> None:
            """Each seed's summed loss and correct count into its progress (waits for the device)."""
            for progress, loss_sum, correct in zip(progresses, np.asarray(metrics["loss_sum"]),
                                                   np.asarray(metrics["correct"]), strict=True):
                progress.update(images, float(loss_sum.sum()), int(correct.sum()))

        started = time.perf_counter()
        own_parts = [plan.shard(processes.index, processes.count) for plan in plans] if processes.count > 1 else plans
        batches = stacked_batches(own_parts, mnist.train_images, mnist.train_labels, split_along(mesh, 1))
        states = train_epoch(step, states, keys, batches, report)
        epoch_seconds = time.perf_counter() - started
        progresses[0].close()

        if recipe.averages_after(epoch):
            states = average(states)
        recalibration_seconds = 0.0
        if recipe.recalibrates_after(epoch, epochs):
            started = time.perf_counter()
            states = recalibrate_batchnorm(states, statistics, normalize(mnist.train_images[:len(first_plan.order)]),
                                  recipe.batch_size, split_along(mesh, 0))
            recalibration_seconds = time.perf_counter() - started

        started = time.perf_counter()
        log_probs = predict(evaluate, evaluated_variables_of(states), evaluated_on.inputs, settings.test_batch_size,
                            split_along(mesh, 0))
        evaluations = [evaluate_log_probs(seed_log_probs, evaluated_on.labels) for seed_log_probs in log_probs]
        eval_seconds = time.perf_counter() - started
        finite = np.asarray(check_finite(states))
        for run, evaluation, seed_finite in zip(runs, evaluations, finite, strict=True):
            refuse_non_finite(run.out, epoch, evaluated_on.name, evaluation, bool(seed_finite))
        for index, (log, progress, evaluation) in enumerate(zip(logs, progresses, evaluations, strict=True)):
            record = EpochRecord(epoch, lr, progress.loss, progress.accuracy, evaluation.loss, evaluation.accuracy,
                                 epoch_seconds, eval_seconds, compile_seconds() - compiled_before,
                                 recalibration_seconds)
            log.end_epoch(record, evaluation,
                          lambda meta, index=index, states=states: checkpoint_bytes(_seed(states, index), meta))

    if not processes.is_main:
        return []
    for index, (log, evaluation) in enumerate(zip(logs, evaluations, strict=True)):
        log.finish(evaluation, model_bytes(_seed(evaluated_variables_of(states), index)) if settings.save_model
                   else None)
    histories = [log.history for log in logs]
    write_seeds_summary(settings, seeds, histories)
    return histories


def _seed(tree: Any, index: int) -> Any:
    """Seed `index`'s part of a stacked tree, as NumPy arrays. Read from this process's own copy
    of the replicated state, so that process 0 may do it alone."""
    return jax.tree_util.tree_map(lambda leaf: jax.device_get(leaf)[index], tree)

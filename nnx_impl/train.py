"""`python -m nnx_impl.train`: train the Session 6 model with Flax NNX, the whole run top to bottom.

    flags -> settings -> data -> model and optimiser -> for each epoch: train, evaluate, record -> save

The same run as `python -m jax_impl.train` and `python -m torch_ref.train`: same flags, batches,
output and artefacts. The model, its optimiser and its weight average are objects changed in
place by compiled steps (nnx_impl.training), as PyTorch's are by eager ones; several seeds
(--seeds) go through nnx_impl.seeds. What NNX shares with the linen twin rather than repeats (the
optimiser and schedule, devices, the batches, process start-up, the compilation cache) is
imported from jax_impl.
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np
from flax import nnx

from common.batching import check_even_shards
from common.cli import FrameworkHelp, build_parser
from common.errors import UserFacingError
from common.interrupts import catch_interrupts
from common.metrics import EpochRecord, evaluate_log_probs
from common.processes import SINGLE_PROCESS, Processes
from common.run import (
    announce,
    epoch_count,
    epoch_plan,
    epoch_progress,
    error_status,
    evaluation_set,
    interrupted_status,
    load_data,
)
from common.run_log import RunLog, refuse_non_finite
from common.settings import RunSettings, checkpoint_path, devices_to_resume, settings_from_args
from common.transforms import normalize
from jax_impl import data
from jax_impl.devices import describe, limit_threads, select_devices
from jax_impl.distributed import data_mesh, join_processes, put_replicated, replicated, split_along
from jax_impl.fast.choice import resolve_ops
from jax_impl.fast.compile_clock import compile_seconds, enable_compilation_cache
from jax_impl.optim import learning_rate_schedule, make_optimizer
from nnx_impl.averaging import averaged_model, evaluated_model
from nnx_impl.checkpoints import NAMES, checkpoint_bytes, model_bytes, read_checkpoint, restore
from nnx_impl.fast.choice import layers_for
from nnx_impl.model import Net
from nnx_impl.recalibration import recalibrate_batchnorm
from nnx_impl.seeds import train_seeds
from nnx_impl.training import create_train_state, is_finite, predict, swa_step, train_epoch

HELP = FrameworkHelp(
    seeds="Flax NNX: seed after seed, each a run of its own (the linen twin vmaps them on accelerators)",
    fast_ops="layers tuned for XLA's CPU backend (nnx_impl/fast, the operations of jax_impl/fast). auto: fast on "
             "a CPU, where they were measured faster; plain on accelerators",
    devices="One JAX process drives them all; on a CPU the trainer itself asks JAX for N CPU devices. "
            "Several processes join through jax.distributed, set up from $JAX_COORDINATOR_ADDRESS, "
            "$JAX_NUM_PROCESSES and $JAX_PROCESS_ID.",
    model_file=NAMES.model_name,
)


def main(argv: list[str] | None = None) -> int:
    """Entry point: flags -> settings -> train; returns the process exit status."""
    args = build_parser(NAMES.title, "nnx_impl.train", HELP).parse_args(argv)
    processes = SINGLE_PROCESS
    catch_interrupts()
    try:
        resumed = read_checkpoint(checkpoint_path(NAMES, args.resume)) if args.resume else None
        meta = resumed[0] if resumed else None
        if meta:  # the checkpoint's devices unless others are asked for: JAX's results do not depend on their number
            args.devices = devices_to_resume(args.devices, meta)
        processes = join_processes(args.device, args.devices)
        if args.seeds:
            train_seeds(settings_from_args(NAMES, args, None, processes.is_main), args.seeds, processes, train)
            return 0
        train(settings_from_args(NAMES, args, meta, processes.is_main), processes, resumed)
    except UserFacingError as error:
        return error_status(error, processes)
    except KeyboardInterrupt:
        return interrupted_status()
    return 0


def train(settings: RunSettings, processes: Processes = SINGLE_PROCESS,
          resumed: tuple[dict, dict] | None = None) -> list[EpochRecord]:
    """One seed's run into settings.out; `resumed` (meta, payload) continues it from its checkpoint.
    On N devices the model's state is replicated and every batch split over them; XLA makes the
    step compute what one device computes, BatchNorm included. Returns the run's history in
    process 0; the other processes of a multi-process run write nothing and return none."""
    recipe = settings.recipe
    mnist = load_data(settings, processes)
    evaluated_on = evaluation_set(settings, mnist)
    epochs = epoch_count(settings)
    first_plan = epoch_plan(settings, mnist, 1)

    limit_threads(settings.threads)
    devices = select_devices(settings.device, settings.devices)
    if len(devices) > 1:
        check_even_shards(recipe.batch_size, len(first_plan.order), len(devices))
    ops = resolve_ops(settings.ops, devices[0].platform)
    mesh = data_mesh(devices)
    whole = replicated(mesh)

    # The seed's root key splits into the weights' and dropout's, as in the linen twin.
    init_key, dropout_key = jax.random.split(jax.random.key(settings.seed))
    model = Net(dropout=recipe.dropout, layers=layers_for(ops), rngs=nnx.Rngs(init_key))
    schedule = learning_rate_schedule(recipe, len(first_plan.batch_slices()))
    optimizer = create_train_state(model, make_optimizer(recipe, schedule))
    averaged = averaged_model(model, recipe)
    if resumed:  # before anything is written: a checkpoint that does not fit changes no file
        restore(model, optimizer, averaged, resumed[1])
    for placed in (model, optimizer, averaged):
        if placed is not None:
            nnx.update(placed, put_replicated(nnx.state(placed), whole))
    key = put_replicated(dropout_key, whole)

    done = len(resumed[0]["history"]) if resumed else 0
    # nnx.jit takes no compiler options: the step keeps XLA's defaults (docs/speed.md, "Temporary heaps").
    facts = {**describe(devices, ops, {}), "framework": NAMES.title, "epoch": "loop"}
    log = RunLog(NAMES, settings, facts, evaluated_on, resumed[0]["history"] if resumed else None) \
        if processes.is_main else None
    if log:
        announce(NAMES, settings, facts, done, epochs)

    evaluation = None
    for epoch in range(done + 1, epochs + 1):
        plan = epoch_plan(settings, mnist, epoch)
        if log and epoch == 1:
            log.plot_samples(plan, mnist)
        lr, compiled_before = float(schedule(int(jax.device_get(optimizer.step[...])))), compile_seconds()
        progress = epoch_progress(epoch, epochs, plan, shown=processes.is_main)

        def report(images: int, metrics: dict, progress=progress) -> None:
            """Steps' summed loss and correct count into the epoch's progress (waits for the device)."""
            progress.update(images, float(np.sum(metrics["loss_sum"])), int(np.sum(metrics["correct"])))

        started = time.perf_counter()
        own_part = plan.shard(processes.index, processes.count) if processes.count > 1 else plan
        batches = data.host_batches(own_part, mnist.train_images, mnist.train_labels, split_along(mesh, 0))
        train_epoch(model, optimizer, key, batches, report, recipe.label_smoothing, averaged)
        epoch_seconds = time.perf_counter() - started
        progress.close()

        if recipe.averages_after(epoch):
            swa_step(model, averaged)
        recalibration_seconds = 0.0
        if recipe.recalibrates_after(epoch, epochs):
            started = time.perf_counter()
            training_images = normalize(mnist.train_images[:len(first_plan.order)])
            recalibrate_batchnorm(evaluated_model(model, averaged), training_images, recipe.batch_size,
                                  split_along(mesh, 0))
            recalibration_seconds = time.perf_counter() - started

        started = time.perf_counter()
        log_probs = predict(evaluated_model(model, averaged), evaluated_on.inputs, settings.test_batch_size,
                            split_along(mesh, 0))
        evaluation = evaluate_log_probs(log_probs, evaluated_on.labels)
        eval_seconds = time.perf_counter() - started
        refuse_non_finite(settings.out, epoch, evaluated_on.name, evaluation, bool(is_finite(model, averaged)))
        if log:
            record = EpochRecord(epoch, lr, progress.loss, progress.accuracy, evaluation.loss, evaluation.accuracy,
                                 epoch_seconds, eval_seconds, compile_seconds() - compiled_before,
                                 recalibration_seconds)
            log.end_epoch(record, evaluation, lambda meta: checkpoint_bytes(model, optimizer, averaged, meta))

    if evaluation is None:  # resumed a run that had already finished: evaluate it again
        log_probs = predict(evaluated_model(model, averaged), evaluated_on.inputs, settings.test_batch_size,
                            split_along(mesh, 0))
        evaluation = evaluate_log_probs(log_probs, evaluated_on.labels)
    if not log:
        return []
    log.finish(evaluation, model_bytes(evaluated_model(model, averaged)) if settings.save_model else None)
    return log.history


if __name__ == "__main__":
    enable_compilation_cache()
    sys.exit(main())

"""`python -m jax_impl.train`: train the Session 6 model with JAX, the whole run top to bottom.

    flags -> settings -> data -> state -> for each epoch: train, evaluate, record -> save

The same run as `python -m torch_ref.train`, line for line where the frameworks allow: same
flags, batches, output and artefacts. The training itself is jax_impl.training; several seeds
(--seeds) go through jax_impl.seeds. Compiled programs are kept in a persistent cache
(override the folder with $JAX_COMPILATION_CACHE_DIR), so a second run starts without compiling.
"""

from __future__ import annotations

import functools
import sys
import time

import jax
import numpy as np

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
from jax_impl.checkpoints import NAMES, checkpoint_bytes, model_bytes, read_checkpoint, restore
from jax_impl.devices import describe, limit_threads, select_devices
from jax_impl.distributed import data_mesh, join_processes, put_replicated, replicated, split_along
from jax_impl.fast.choice import layers_for, resolve_ops
from jax_impl.fast.compile_clock import compile_seconds, enable_compilation_cache
from jax_impl.fast.heaps import step_compiler_options
from jax_impl.model import Net
from jax_impl.optim import learning_rate_schedule, make_optimizer
from jax_impl.recalibration import batch_statistics, recalibrate_batchnorm, statistics_model
from jax_impl.seeds import train_seeds
from jax_impl.training import (
    create_train_state,
    eval_step,
    evaluated_variables_of,
    is_finite,
    predict,
    scan_epoch,
    swa_step,
    train_epoch,
    train_step,
)

HELP = FrameworkHelp(
    seeds="JAX: seed after seed on a CPU; on an accelerator one compiled program over the stacked "
          "training states, vmapped",
    fast_ops="layers tuned for XLA's CPU backend (jax_impl/fast). auto: fast on a CPU, where they were "
             "measured faster; plain on accelerators",
    devices="One JAX process drives them all; on a CPU the trainer itself asks JAX for N CPU devices. "
            "Several processes join through jax.distributed, set up from $JAX_COORDINATOR_ADDRESS, "
            "$JAX_NUM_PROCESSES and $JAX_PROCESS_ID.",
    model_file=NAMES.model_name,
)
EPOCH_KINDS = ("loop", "scan")  # training.train_epoch, training.scan_epoch


def main(argv: list[str] | None = None) -> int:
    """Entry point: flags -> settings -> train; returns the process exit status."""
    args = build_parser(NAMES.title, "jax_impl.train", HELP).parse_args(argv)
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


def default_epoch(platform: str) -> str:
    """The step loop on CPU, one scan per epoch on accelerators (measurements in docs/speed.md)."""
    return "loop" if platform == "cpu" else "scan"


def train(settings: RunSettings, processes: Processes = SINGLE_PROCESS, resumed: tuple[dict, dict] | None = None,
          epoch_kind: str | None = None) -> list[EpochRecord]:
    """One seed's run into settings.out; `resumed` (meta, payload) continues it from its checkpoint.
    On N devices the state is replicated and every batch split over them, and the same step computes
    what one device computes, BatchNorm included (jax_impl.distributed). Returns the run's history in
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
    platform = devices[0].platform
    ops = resolve_ops(settings.ops, platform)
    layers = layers_for(ops)  # the one switch between the plain and the CPU-tuned layers
    epoch_kind = epoch_kind or default_epoch(platform)
    if epoch_kind not in EPOCH_KINDS:
        raise ValueError(f"unknown epoch {epoch_kind!r}: expected one of {', '.join(EPOCH_KINDS)}")
    mesh = data_mesh(devices)
    whole = replicated(mesh)

    model = Net(dropout=recipe.dropout, layers=layers)
    schedule = learning_rate_schedule(recipe, len(first_plan.batch_slices()))
    state, key = create_train_state(model, make_optimizer(recipe, schedule), settings.seed, recipe)
    if resumed:  # before anything is written: a checkpoint that does not fit changes no file
        state = restore(state, resumed[1])
    state, key = put_replicated((state, key), whole)
    # On CPU, the step loop's step keeps its temporaries where malloc reuses them (jax_impl.fast.heaps).
    step_options = step_compiler_options(platform, recipe.batch_size) if epoch_kind == "loop" else {}
    step = jax.jit(train_step, donate_argnums=0, out_shardings=whole, compiler_options=step_options)
    scan = jax.jit(scan_epoch, static_argnames="crop_size", donate_argnums=0, out_shardings=whole)
    evaluate = jax.jit(functools.partial(eval_step, model.apply), out_shardings=whole)
    average = jax.jit(swa_step, donate_argnums=0, out_shardings=whole)
    statistics = jax.jit(functools.partial(batch_statistics, statistics_model(layers)), out_shardings=whole)
    resident = data.resident_data(whole)

    done = len(resumed[0]["history"]) if resumed else 0
    facts = {**describe(devices, ops, step_options), "epoch": epoch_kind}
    log = RunLog(NAMES, settings, facts, evaluated_on, resumed[0]["history"] if resumed else None) \
        if processes.is_main else None
    if log:
        announce(NAMES, settings, facts, done, epochs)

    evaluation = None
    for epoch in range(done + 1, epochs + 1):
        plan = epoch_plan(settings, mnist, epoch)
        if log and epoch == 1:
            log.plot_samples(plan, mnist)
        lr, compiled_before = float(schedule(int(jax.device_get(state.step)))), compile_seconds()
        progress = epoch_progress(epoch, epochs, plan, shown=processes.is_main)

        def report(images: int, metrics: dict, progress=progress) -> None:
            """Steps' summed loss and correct count into the epoch's progress (waits for the device)."""
            progress.update(images, float(np.sum(metrics["loss_sum"])), int(np.sum(metrics["correct"])))

        started = time.perf_counter()
        own_part = plan.shard(processes.index, processes.count) if processes.count > 1 else plan
        if epoch_kind == "loop":
            batches = data.host_batches(own_part, mnist.train_images, mnist.train_labels, split_along(mesh, 0))
            state = train_epoch(step, state, key, batches, report)
        else:
            images, labels = resident(mnist.train_images, mnist.train_labels)
            for count, draws in data.scan_blocks(own_part, split_along(mesh, 1)):
                state, metrics = scan(state, key, images, labels, *draws, crop_size=plan.crop_size)
                report(count, metrics)
        epoch_seconds = time.perf_counter() - started
        progress.close()

        if recipe.averages_after(epoch):
            state = average(state)
        recalibration_seconds = 0.0
        if recipe.recalibrates_after(epoch, epochs):
            started = time.perf_counter()
            state = recalibrate_batchnorm(state, statistics, normalize(mnist.train_images[:len(first_plan.order)]),
                                 recipe.batch_size, split_along(mesh, 0))
            recalibration_seconds = time.perf_counter() - started

        started = time.perf_counter()
        log_probs = predict(evaluate, evaluated_variables_of(state), evaluated_on.inputs, settings.test_batch_size,
                            split_along(mesh, 0))
        evaluation = evaluate_log_probs(log_probs, evaluated_on.labels)
        eval_seconds = time.perf_counter() - started
        refuse_non_finite(settings.out, epoch, evaluated_on.name, evaluation, bool(is_finite(state)))
        if log:
            record = EpochRecord(epoch, lr, progress.loss, progress.accuracy, evaluation.loss, evaluation.accuracy,
                                 epoch_seconds, eval_seconds, compile_seconds() - compiled_before,
                                 recalibration_seconds)
            log.end_epoch(record, evaluation, lambda meta, state=state: checkpoint_bytes(state, meta))

    if evaluation is None:  # resumed a run that had already finished: evaluate it again
        log_probs = predict(evaluate, evaluated_variables_of(state), evaluated_on.inputs, settings.test_batch_size,
                            split_along(mesh, 0))
        evaluation = evaluate_log_probs(log_probs, evaluated_on.labels)
    if not log:
        return []
    log.finish(evaluation, model_bytes(evaluated_variables_of(state)) if settings.save_model else None)
    return log.history


if __name__ == "__main__":
    enable_compilation_cache()
    sys.exit(main())

"""`python -m torch_ref.train`: train the Session 6 model with PyTorch, the whole run top to bottom.

    flags -> settings -> data -> state -> for each epoch: train, evaluate, record -> save

The same run as `python -m jax_impl.train`, line for line where the frameworks allow: same
flags, batches, output and artefacts. The training itself is torch_ref.training; several seeds
(--seeds) go through torch_ref.seeds.
"""

from __future__ import annotations

import sys
import time

import torch

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
from torch_ref import data
from torch_ref.averaging import evaluated_model
from torch_ref.checkpoints import NAMES, checkpoint_bytes, model_bytes, read_checkpoint, restore
from torch_ref.devices import describe, limit_threads, resolve_ops, select_device
from torch_ref.distributed import (
    CPU_BATCHNORM,
    data_parallel,
    join_processes,
    launch_processes,
    launched_processes,
    launches_processes,
    requested_count,
    share_main_buffers,
    summed_over_processes,
    threads_per_process,
    uses_cuda,
)
from torch_ref.model import Net
from torch_ref.optim import make_optimizer, make_scheduler
from torch_ref.recalibration import recalibrate_batchnorm
from torch_ref.seeds import train_seeds
from torch_ref.training import create_train_state, is_finite, predict, train_epoch

HELP = FrameworkHelp(
    seeds="PyTorch: one after another, each in its own random stream",
    fast_ops="the channels_last memory format (NHWC). auto: plain on every device, since channels_last "
             "wins on some CPUs and loses on others (python benchmarks/compare.py shows which on yours)",
    devices="PyTorch: one process per device, started through torch.distributed's elastic launcher (or by "
            "torchrun, whose process count it then follows), DistributedDataParallel over gloo (CPU) or "
            "nccl (CUDA).",
    model_file=NAMES.model_name,
)


def main(argv: list[str] | None = None) -> int:
    """Entry point: flags -> settings -> train; returns the process exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(NAMES.title, "torch_ref.train", HELP).parse_args(argv)
    processes = SINGLE_PROCESS
    catch_interrupts()
    try:
        resumed = read_checkpoint(checkpoint_path(NAMES, args.resume)) if args.resume else None
        meta = resumed[0] if resumed else None
        if meta:  # the checkpoint's number of processes, or torchrun's
            launched = launched_processes()
            args.devices = devices_to_resume(args.devices if args.devices is not None or not launched else launched[0],
                                             meta, requested_count, None if uses_cuda(args.device) else CPU_BATCHNORM)
        if launches_processes(args.devices):
            settings_from_args(NAMES, args, meta)  # every flag checked once, before any process starts
            return launch_processes(args.devices, argv, main)  # one per device; waits for them
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
    Across processes (torch_ref.distributed) each trains its part of every batch under
    DistributedDataParallel. Returns the run's history in process 0; the other processes of a
    multi-process run write nothing and return none."""
    recipe = settings.recipe
    mnist = load_data(settings, processes)
    evaluated_on = evaluation_set(settings, mnist)
    epochs = epoch_count(settings)
    first_plan = epoch_plan(settings, mnist, 1)

    limit_threads(threads_per_process(settings.threads, processes))
    device = select_device(settings.device)
    ops = resolve_ops(settings.ops)
    resident = data.resident_data(device)

    torch.manual_seed(settings.seed)  # the initial weights, then the dropout masks
    model = Net(dropout=recipe.dropout).to(device)
    if ops == "fast":
        model = model.to(memory_format=torch.channels_last)  # NHWC memory, the same maths
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe, len(first_plan.batch_slices()))
    state = create_train_state(model, optimizer, scheduler, recipe, device)
    if processes.count > 1:
        check_even_shards(recipe.batch_size, len(first_plan.order), processes.count)
        state.network = data_parallel(state.model, device)
    if resumed:  # before anything is written: a checkpoint that does not fit changes no file
        restore(state, resumed[1])

    done = len(resumed[0]["history"]) if resumed else 0
    facts = {**describe(device, ops), "devices": processes.count, "processes": processes.count}
    log = RunLog(NAMES, settings, facts, evaluated_on, resumed[0]["history"] if resumed else None) \
        if processes.is_main else None
    if log:
        announce(NAMES, settings, facts, done, epochs)

    evaluation = None
    for epoch in range(done + 1, epochs + 1):
        plan = epoch_plan(settings, mnist, epoch)
        if log and epoch == 1:
            log.plot_samples(plan, mnist)
        lr = state.optimizer.param_groups[0]["lr"]
        progress = epoch_progress(epoch, epochs, plan, shown=processes.is_main)

        def report(images: int, metrics: dict, progress=progress) -> None:
            """A step's summed loss and correct count into the epoch's progress."""
            progress.update(images, float(metrics["loss_sum"]), int(metrics["correct"]))

        started = time.perf_counter()
        own_part = plan.shard(processes.index, processes.count) if processes.count > 1 else plan
        if processes.count > 1:
            report = summed_over_processes(report, device)
        if device.type == "cuda":
            batches = data.resident_batches(own_part, *resident(mnist.train_images, mnist.train_labels))
        else:
            batches = data.host_batches(own_part, mnist.train_images, mnist.train_labels, device)
        state = train_epoch(state, batches, report)
        if processes.count > 1:
            share_main_buffers(state.model, state.averaged)
        epoch_seconds = time.perf_counter() - started
        progress.close()

        if recipe.averages_after(epoch):
            state.averaged.update_parameters(state.model)
        recalibration_seconds = 0.0
        if recipe.recalibrates_after(epoch, epochs):  # every process computes it: the statistics come out the same
            started = time.perf_counter()
            recalibrate_batchnorm(evaluated_model(state.model, state.averaged),
                                  normalize(mnist.train_images[:len(first_plan.order)]), recipe.batch_size, device)
            recalibration_seconds = time.perf_counter() - started

        started = time.perf_counter()
        log_probs = predict(evaluated_model(state.model, state.averaged), evaluated_on.inputs,
                            settings.test_batch_size, device)
        evaluation = evaluate_log_probs(log_probs, evaluated_on.labels)
        eval_seconds = time.perf_counter() - started
        refuse_non_finite(settings.out, epoch, evaluated_on.name, evaluation, is_finite(state))
        if log:
            record = EpochRecord(epoch, lr, progress.loss, progress.accuracy, evaluation.loss, evaluation.accuracy,
                                 epoch_seconds, eval_seconds, 0.0, recalibration_seconds)  # eager: nothing compiled
            log.end_epoch(record, evaluation, lambda meta, state=state: checkpoint_bytes(state, meta))

    if evaluation is None:  # resumed a run that had already finished: evaluate it again
        log_probs = predict(evaluated_model(state.model, state.averaged), evaluated_on.inputs,
                            settings.test_batch_size, device)
        evaluation = evaluate_log_probs(log_probs, evaluated_on.labels)
    if not log:
        return []
    log.finish(evaluation, model_bytes(evaluated_model(state.model, state.averaged)) if settings.save_model else None)
    return log.history


if __name__ == "__main__":
    sys.exit(main())

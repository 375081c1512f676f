"""The twins mirror each other: torch_ref, jax_impl and nnx_impl hold modules of the same names,
and each module defines the same top-level names in the same order in every twin, so that a
reader can put them side by side. What only one framework has is listed here with its reason,
as is what the NNX twin imports from the linen twin instead of repeating it; any other
difference fails.

Read from the source with `ast`, never by importing it.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TWINS = ("torch_ref", "jax_impl", "nnx_impl")
ONLY_IN_JAX_PACKAGES = {"fast": "the CPU-tuned layers behind --ops fast; PyTorch's --ops fast is channels_last"}

# Modules of the linen twin that the NNX twin imports rather than repeats: module -> why.
NNX_TAKES_FROM_LINEN = {
    "augment": "the device-side warp works on arrays, whichever API holds the model",
    "data": "batches as sharded jax.Arrays, the same for both Flax APIs",
    "devices": "--device, --devices and --threads are JAX's, not Flax's",
    "distributed": "jax.distributed and the mesh are JAX's",
    "optim": "the same optax optimiser and schedules",
    "summary": "the layer table: the NNX model's variables are the linen tree (tests/parity/test_nnx.py)",
}
# Names of a mirrored module that the NNX twin imports from the linen twin's: (module, name) -> why.
NNX_NAMES_FROM_LINEN = {
    ("training", "Metrics"): "a step's metrics, the same dictionary",
    ("training", "TrainState"): "NNX's state is the model and its nnx.Optimizer themselves",
    ("training", "training_loss"): "the same loss function",
}

# (package, module, name) -> why only this framework has it.
FRAMEWORK_ONLY = {
    ("jax_impl", "averaging", "WeightAverage"): "AveragedModel's state as a pytree: JAX has no module to hold it",
    ("jax_impl", "averaging", "start_average"): "AveragedModel(model) as a pure function",
    ("jax_impl", "averaging", "lerp"): "torch.lerp's formula, which AveragedModel's EMA uses",
    ("jax_impl", "averaging", "updated_average"): "AveragedModel.update_parameters as a pure function",
    ("jax_impl", "averaging", "ema_update"): "get_ema_multi_avg_fn's rule",
    ("jax_impl", "averaging", "swa_update"): "get_swa_avg_fn's rule",
    ("jax_impl", "averaging", "evaluated_variables"): "the average's variables, where PyTorch picks a module",
    ("torch_ref", "averaging", "averaged_model"): "torch.optim.swa_utils.AveragedModel, built",
    ("torch_ref", "averaging", "evaluated_model"): "the module evaluated: the average's or the model",
    ("torch_ref", "averaging", "averaged_state_dict"): "AveragedModel's state_dict prefixes the model's keys",
    ("jax_impl", "checkpoints", "restored"): "a state dict put into a template tree, shapes checked",
    ("jax_impl", "checkpoints", "_evaluated_state"): "the averaged variables of a saved state dict",
    ("torch_ref", "checkpoints", "tensor_to_array"): "tensors as NumPy arrays for the digest",
    ("torch_ref", "checkpoints", "load_weights"): "load_state_dict(strict=True) with a clear error",
    ("jax_impl", "data", "global_array"): "a process's part of a batch as one global jax.Array",
    ("jax_impl", "data", "scan_draws"): "a whole epoch's draws for lax.scan",
    ("jax_impl", "data", "scan_blocks"): "those draws on the devices",
    ("torch_ref", "data", "to_tensor"): "NumPy images as an NCHW tensor",
    ("torch_ref", "data", "EpochBatches"): "an epoch as a torch Dataset, the PyTorch way to feed a DataLoader",
    ("torch_ref", "data", "resident_batches"): "the GPU path; JAX's accelerator path is the scan epoch",
    ("jax_impl", "devices", "_platform"): "--device as a JAX backend name",
    ("jax_impl", "devices", "select_devices"): "one JAX process drives several devices",
    ("torch_ref", "devices", "resolve_ops"): "JAX's --ops choice lives in jax_impl.fast.choice",
    ("jax_impl", "distributed", "DATA_AXIS"): "the mesh axis every batch is split along",
    ("jax_impl", "distributed", "PROCESS_ENV"): "jax.distributed's environment",
    ("jax_impl", "distributed", "_initialize_distributed"): "jax.distributed.initialize, its environment checked",
    ("jax_impl", "distributed", "data_mesh"): "a device mesh; PyTorch has one process per device instead",
    ("jax_impl", "distributed", "replicated"): "a sharding: the state on every device",
    ("jax_impl", "distributed", "put_replicated"): "the state placed on the mesh",
    ("jax_impl", "distributed", "split_along"): "a sharding: the batch cut over the devices",
    ("torch_ref", "distributed", "LAUNCHED_ENV"): "torchrun's environment",
    ("torch_ref", "distributed", "AGENT_STORE_ENV"): "whether torchrun's agent holds the rendezvous",
    ("torch_ref", "distributed", "PARENT_POLL_SECONDS"): "how often a launched process looks for its launcher",
    ("torch_ref", "distributed", "CPU_BATCHNORM"): "why a PyTorch CPU run cannot change its process count",
    ("torch_ref", "distributed", "uses_cuda"): "nccl and SyncBatchNorm, or gloo",
    ("torch_ref", "distributed", "launched_processes"): "torchrun's environment, checked",
    ("torch_ref", "distributed", "launches_processes"): "whether this process starts the others",
    ("torch_ref", "distributed", "_end_with"): "launched processes end with their launcher",
    ("torch_ref", "distributed", "requested_count"): "--devices as a number of processes",
    ("torch_ref", "distributed", "launch_processes"): "PyTorch starts one process per device; JAX needs none",
    ("torch_ref", "distributed", "_train_in_process"): "what each launched process runs",
    ("torch_ref", "distributed", "threads_per_process"): "the cores shared by the processes on one machine",
    ("torch_ref", "distributed", "data_parallel"): "DistributedDataParallel; XLA inserts JAX's collectives",
    ("torch_ref", "distributed", "summed_over_processes"): "metrics summed with all_reduce",
    ("torch_ref", "distributed", "share_main_buffers"): "DDP keeps BatchNorm statistics per process",
    ("jax_impl", "model", "torch_conv_init"): "PyTorch's default initialisation, which Flax does not have",
    ("jax_impl", "model", "bessel_correction"): "PyTorch's unbiased running variance",
    ("jax_impl", "model", "BatchNorm2d"): "nn.BatchNorm2d's semantics, which Flax's BatchNorm does not have",
    ("jax_impl", "model", "normalize_with_batch_statistics"): "BatchNorm's training-mode maths, shared with NNX",
    ("jax_impl", "model", "MaxPool2d"): "nn.MaxPool2d as a swappable layer",
    ("jax_impl", "model", "AvgPool2d"): "nn.AvgPool2d as a swappable layer",
    ("jax_impl", "model", "Layers"): "the layer implementations the model is built from (plain or fast)",
    ("jax_impl", "model", "PLAIN_LAYERS"): "the plain ones",
    ("jax_impl", "model", "conv_block"): "conv -> ReLU -> BatchNorm -> Dropout, written once",
    ("torch_ref", "model", "_batchnorm"): "nn.BatchNorm2d with the spec's settings",
    ("jax_impl", "optim", "learning_rate_schedule"): "optax takes the schedule as a function of the step",
    ("jax_impl", "optim", "one_cycle"): "OneCycleLR's formula; optax's places the phase boundary elsewhere",
    ("torch_ref", "optim", "make_scheduler"): "PyTorch's scheduler is an object stepped beside the optimiser",
    ("torch_ref", "optim", "one_cycle_scheduler"): "OneCycleLR, built for the schedules that start with it",
    ("jax_impl", "optim", "swa"): "SWALR's formula as a function of the step, where PyTorch's is a scheduler object",
    ("jax_impl", "recalibration", "statistics_model"): "update_bn's pass as a model with momentum 1",
    ("jax_impl", "recalibration", "batch_statistics"): "one batch's statistics, a pure function",
    ("jax_impl", "recalibration", "recalibrated_batch_stats"): "update_bn's cumulative average",
    ("torch_ref", "recalibration", "dropout_off"): "update_bn runs the module in train mode, dropout included",
    ("jax_impl", "seeds", "create_seed_states"): "seeds stacked for vmap",
    ("jax_impl", "seeds", "_stacked"): "trees stacked on a leading axis",
    ("jax_impl", "seeds", "stacked_batches"): "each seed's batch, stacked",
    ("jax_impl", "seeds", "train_vmapped"): "the seeds as one vmapped program, on accelerators",
    ("jax_impl", "seeds", "_seed"): "one seed's part of a stacked tree",
    ("jax_impl", "summary", "TORCH_LAYER_NAMES"): "the PyTorch names the summary shows beside Flax's",
    ("jax_impl", "summary", "torch_layer_name"): "maps one",
    ("jax_impl", "train", "EPOCH_KINDS"): "the step loop or one lax.scan per epoch",
    ("jax_impl", "train", "default_epoch"): "which of the two a platform runs",
    ("jax_impl", "training", "check_batch"): "chex's trace-time checks of shapes and dtypes",
    ("jax_impl", "training", "scan_epoch"): "an epoch as one lax.scan",
    ("jax_impl", "training", "swa_step"): "AveragedModel.update_parameters as a step",
    ("jax_impl", "training", "variables_of"): "the state's variables; a PyTorch model holds its own",
    ("jax_impl", "training", "evaluated_variables_of"): "the variables evaluated (averaging.evaluated_model)",
    ("torch_ref", "training", "seed_random_stream"): "dropout draws from PyTorch's global generator; JAX passes keys",
    ("nnx_impl", "averaging", "AveragedModel"): "torch.optim.swa_utils.AveragedModel as an nnx.Module",
    ("nnx_impl", "averaging", "averaged_model"): "as torch_ref's: the recipe's average, built",
    ("nnx_impl", "averaging", "evaluated_model"): "as torch_ref's: the module evaluated",
    ("nnx_impl", "checkpoints", "training_state"): "the model, optimiser and average as plain arrays",
    ("nnx_impl", "checkpoints", "check_fits"): "every name and shape checked before an object changes in place",
    ("nnx_impl", "checkpoints", "_framework_of"): "an NNX checkpoint told apart from the linen files it also reads",
    ("nnx_impl", "model", "BatchNorm2d"): "as the linen twin's: nn.BatchNorm2d's semantics",
    ("nnx_impl", "model", "MaxPool2d"): "as the linen twin's",
    ("nnx_impl", "model", "AvgPool2d"): "as the linen twin's",
    ("nnx_impl", "model", "Layers"): "as the linen twin's",
    ("nnx_impl", "model", "PLAIN_LAYERS"): "as the linen twin's",
    ("nnx_impl", "model", "variables_of"): "the model's state as the linen twin's variables",
    ("nnx_impl", "model", "load_variables"): "and back, in place",
    ("nnx_impl", "recalibration", "statistics_model"): "as the linen twin's: a copy with momentum 1",
    ("nnx_impl", "recalibration", "batch_statistics"): "as the linen twin's",
    ("nnx_impl", "training", "swa_step"): "as the linen twin's",
}


def top_level_names(path: Path) -> list[str]:
    """Functions, classes and assigned names at the top of a module, in order."""
    names = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [target.id for target in node.targets if isinstance(target, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return names


def modules(package: str) -> set[str]:
    return {path.stem for path in (REPO_ROOT / package).glob("*.py") if path.stem != "__init__"}


def test_the_twins_hold_modules_of_the_same_names():
    assert modules("torch_ref") == modules("jax_impl") == modules("nnx_impl") | set(NNX_TAKES_FROM_LINEN)
    assert not modules("nnx_impl") & set(NNX_TAKES_FROM_LINEN)
    for package in ("jax_impl", "nnx_impl"):
        subpackages = {path.name for path in (REPO_ROOT / package).iterdir() if (path / "__init__.py").exists()}
        assert subpackages == set(ONLY_IN_JAX_PACKAGES)
    assert not any((path / "__init__.py").exists() for path in (REPO_ROOT / "torch_ref").iterdir())


def test_mirrored_modules_define_the_same_names_in_the_same_order():
    differences = []
    for module in sorted(modules("torch_ref")):
        shared = {package: [name for name in top_level_names(REPO_ROOT / package / f"{module}.py")
                            if (package, module, name) not in FRAMEWORK_ONLY]
                  for package in TWINS if (REPO_ROOT / package / f"{module}.py").exists()}
        expected = shared["torch_ref"]
        for package, names in shared.items():
            wanted = [name for name in expected if package != "nnx_impl" or (module, name) not in NNX_NAMES_FROM_LINEN]
            if names != wanted:
                differences.append(f"{module}: torch_ref {expected} against {package} {names}")
    assert not differences, ("mirrored modules differ (rename, reorder, or list a framework-only name with its "
                             "reason):\n  " + "\n  ".join(differences))


def test_what_the_nnx_twin_takes_from_the_linen_twin_is_there():
    linen_names = {module: top_level_names(REPO_ROOT / "jax_impl" / f"{module}.py") for module, _ in
                   NNX_NAMES_FROM_LINEN}
    assert all(name in linen_names[module] for module, name in NNX_NAMES_FROM_LINEN)
    assert all(not (REPO_ROOT / "nnx_impl" / f"{module}.py").exists() for module in NNX_TAKES_FROM_LINEN)


def test_every_framework_only_name_still_exists():
    stale = [f"{package}.{module}.{name}" for package, module, name in FRAMEWORK_ONLY
             if name not in top_level_names(REPO_ROOT / package / f"{module}.py")]
    assert not stale, f"listed as framework-only but gone: {stale}"

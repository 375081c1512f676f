"""Show that the parity suite can fail: apply classic porting mistakes to the JAX side's plain
layers (the model a porter writes), in memory, and report which parity tests catch each.

    python -m tests.parity.mutations [--twin linen|nnx] [--only NAME ...]

Each mistake runs the whole parity suite in a fresh process (PARITY_MUTATION=<name>, applied
by tests/parity/conftest.py before any test module is imported, and by the processes the tests
start through tests/float64_jax_train.py) and prints a Markdown table. A mistake that only a run
of several processes shows runs tests/test_data_parallel_jax.py instead (`SUITE_OF`). It takes
about as long as the suite takes, once per mutation; run it by hand.

`--twin nnx` (PARITY_MUTATION_TWIN=nnx) makes the same mistakes in the Flax NNX twin instead
(`NNX_MUTATIONS`) and runs the tests over it (`NNX_SUITE`): the mistakes in shared code (the
weight layout, the optimiser and schedule) are the linen ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen

ENVIRONMENT_VARIABLE = "PARITY_MUTATION"
TWIN_VARIABLE = "PARITY_MUTATION_TWIN"
SUITE = Path(__file__).resolve().parent
# A mistake that only a run of several processes can show runs the tests that start one.
SUITE_OF = {"batchnorm_statistics_per_process": SUITE.parent / "test_data_parallel_jax.py"}
# The tests over the NNX twin: its parity tests against PyTorch and its trainer's on several devices.
NNX_SUITE = (SUITE / "test_nnx.py", SUITE.parent / "test_nnx_training.py")


def _flax_namespace(**overrides) -> types.SimpleNamespace:
    """flax.linen with some names replaced, to install as jax_impl.model.nn."""
    return types.SimpleNamespace(**{**vars(linen), **overrides})


def _replace_plain_layers(**changes) -> None:
    """Swap layers of model.PLAIN_LAYERS, which jax_impl.fast.choice.layers_for("plain") hands out."""
    from jax_impl import model

    model.PLAIN_LAYERS = dataclasses.replace(model.PLAIN_LAYERS, **changes)


def flax_batchnorm_momentum() -> None:
    """Flax's default momentum 0.99: running = 0.99 * running + 0.01 * batch."""
    from jax_impl import model

    class FlaxMomentumBatchNorm(model.BatchNorm2d):
        momentum: float = 0.01

    _replace_plain_layers(batchnorm=FlaxMomentumBatchNorm)


def biased_running_variance() -> None:
    """The running variance from the biased batch variance, as Flax's nn.BatchNorm keeps it."""
    from jax_impl import model

    model.bessel_correction = lambda count: 1.0


def same_padding() -> None:
    """Flax's default padding "SAME" instead of PyTorch's 0."""
    from jax_impl import model

    model.nn = _flax_namespace(Conv=lambda *args, **kwargs: linen.Conv(*args, **{**kwargs, "padding": "SAME"}))


def batchnorm_before_relu() -> None:
    """conv -> BatchNorm -> ReLU, the more common order, instead of the seed's conv -> ReLU -> BatchNorm."""
    from jax_impl import model

    model.conv_block = lambda x, conv, batchnorm, train: linen.relu(batchnorm(conv(x), train))


def channel_wise_dropout() -> None:
    """Dropout2d semantics (whole channels) instead of element-wise nn.Dropout."""
    _replace_plain_layers(dropout=functools.partial(linen.Dropout, broadcast_dims=(1, 2)))


def kernel_transposed_wrong() -> None:
    """OIHW -> WHIO (all axes reversed) instead of OIHW -> HWIO: same shape for 3x3 kernels."""
    from bridge import mapping

    mapping.kernel_axes = lambda ndim: tuple(reversed(range(ndim)))


def steplr_per_step() -> None:
    """StepLR's decay every `step_size` optimiser steps instead of every `step_size` epochs."""
    from jax_impl import optim

    def per_step(recipe, steps_per_epoch):
        return optax.exponential_decay(recipe.lr, transition_steps=recipe.schedule.step_size,
                                       decay_rate=recipe.schedule.gamma, staircase=True)

    optim.learning_rate_schedule = per_step


def swalr_anneal_in_steps() -> None:
    """SWALR's annealing over `anneal_epochs` optimiser steps instead of epochs: the porter reads
    PyTorch's SWALR(anneal_epochs=k), stepped once an epoch in PyTorch's examples, as k steps."""
    from jax_impl import optim

    learning_rate_schedule = optim.learning_rate_schedule

    def annealing_in_steps(recipe, steps_per_epoch):
        if recipe.schedule.kind != "swa":
            return learning_rate_schedule(recipe, steps_per_epoch)
        schedule, handover = recipe.schedule, (recipe.swa_start - 1) * steps_per_epoch
        before = optim.one_cycle(recipe.lr, handover, schedule.pct_start, schedule.div_factor,
                                 schedule.final_div_factor)
        return optim.swa(before, handover, schedule.swa_lr, schedule.anneal_epochs, schedule.anneal_strategy)

    optim.learning_rate_schedule = annealing_in_steps


def zoom_dropped_by_jax_pipeline() -> None:
    """The JAX input pipeline warping with the rotation and shift draws only, the zoom left out,
    as a port that kept an older copy of the transforms would."""
    from jax_impl import data

    host_batches = data.host_batches

    def without_zoom(plan, *args, **kwargs):
        return host_batches(dataclasses.replace(plan, scales=np.ones_like(plan.scales)), *args, **kwargs)

    data.host_batches = without_zoom


def decoupled_weight_decay() -> None:
    """Weight decay added after the momentum buffer (decoupled, AdamW-style) instead of to the
    gradient before it, as torch.optim.SGD does."""
    from jax_impl import optim

    def make_optimizer(recipe, schedule):
        momentum = [optax.trace(decay=recipe.momentum, nesterov=recipe.nesterov)] if recipe.momentum else []
        return optax.chain(*momentum, optax.add_decayed_weights(recipe.weight_decay),
                           optax.scale_by_learning_rate(schedule))

    optim.make_optimizer = make_optimizer


def log_softmax_over_batch() -> None:
    """log_softmax over axis 0 (the batch) instead of the classes, as a port of F.log_softmax(x,
    dim=0) or a transposed layout would."""
    from jax_impl import model

    model.nn = _flax_namespace(log_softmax=lambda x, axis=-1: linen.log_softmax(x, axis=0))


def loss_summed_over_batch() -> None:
    """The loss summed over the batch instead of averaged (reduction "sum" for PyTorch's "mean")."""
    from jax_impl import training

    _sum_the_loss(training)


def _sum_the_loss(training: types.ModuleType) -> None:
    """The training module's loss, as its steps call it, times the batch size."""
    mean_loss = training.training_loss
    training.training_loss = lambda log_probs, labels, label_smoothing=0.0: (
        mean_loss(log_probs, labels, label_smoothing) * labels.shape[0])


def dropout_key_reused() -> None:
    """The same dropout key at every step (the step number never folded in), so every training
    step drops the same activations."""
    from jax_impl import training

    _reuse_the_key(training)


def _reuse_the_key(training: types.ModuleType) -> None:
    """The training module's jax.random.fold_in returning the key unchanged."""
    random = types.SimpleNamespace(**{**vars(jax.random), "fold_in": lambda key, data: key})
    training.jax = types.SimpleNamespace(**{**vars(jax), "random": random})


def recalibration_with_training_momentum() -> None:
    """BatchNorm recalibration that keeps the training momentum 0.1 (an exponential average led by
    the last batches) instead of update_bn's equal weight for every batch (momentum None)."""
    from jax_impl import model, recalibration

    recalibration.statistics_model = lambda layers: model.Net(dropout=0.0, layers=layers)


def ema_decay_as_one_minus_decay() -> None:
    """The EMA decay applied to the new weights instead of the average: average = (1 - decay) *
    average + decay * weights, an average that forgets almost at once."""
    from jax_impl import averaging, training

    def ema_update(average, variables, decay):
        return averaging.updated_average(average, variables,
                                         lambda averaged, new: averaging.lerp(averaged, new, decay))

    averaging.ema_update = training.ema_update = ema_update


def batchnorm_statistics_per_process() -> None:
    """BatchNorm statistics of each process's part of the batch instead of the global batch's, as
    DistributedDataParallel computes them without SyncBatchNorm. A run of one process is unchanged."""
    from jax_impl import model
    from jax_impl.fast import layers as fast_layers

    model.BatchNorm2d.normalize_with_batch_statistics = _statistics_per_process
    fast_layers.FastBatchNorm2d.normalize_with_batch_statistics = _statistics_per_process


def _statistics_per_process(module, x, scale, bias):
    """BatchNorm's training-mode normalisation over each process's part of the batch."""
    parts = x.reshape(jax.process_count(), -1, *x.shape[1:])
    axes = tuple(range(1, parts.ndim - 1))
    mean = parts.mean(axes, keepdims=True)
    var = jnp.square(parts - mean).mean(axes, keepdims=True)
    normalised = ((parts - mean) * jax.lax.rsqrt(var + module.epsilon)).reshape(x.shape)
    channels = x.shape[-1]
    return normalised * scale + bias, mean.reshape(-1, channels).mean(0), var.reshape(-1, channels).mean(0)


MUTATIONS = {function.__name__: function for function in (
    flax_batchnorm_momentum, biased_running_variance, same_padding, batchnorm_before_relu,
    channel_wise_dropout, kernel_transposed_wrong, steplr_per_step, decoupled_weight_decay,
    log_softmax_over_batch, loss_summed_over_batch, dropout_key_reused, recalibration_with_training_momentum,
    ema_decay_as_one_minus_decay, batchnorm_statistics_per_process, swalr_anneal_in_steps,
    zoom_dropped_by_jax_pipeline)}

def _nnx_batchnorm_default_momentum() -> None:
    """NNX: flax_batchnorm_momentum's mistake in nnx_impl.model.BatchNorm2d."""
    from nnx_impl import model

    original = model.BatchNorm2d.__init__

    def flax_momentum(self, features, *, momentum=0.01, **kwargs):
        original(self, features, momentum=momentum, **kwargs)

    model.BatchNorm2d.__init__ = flax_momentum


def _nnx_biased_running_variance() -> None:
    from nnx_impl import model

    model.bessel_correction = lambda count: 1.0


def _nnx_namespace(**overrides) -> types.SimpleNamespace:
    """flax.nnx with some names replaced, to install as nnx_impl.model.nnx."""
    from flax import nnx

    return types.SimpleNamespace(**{**vars(nnx), **overrides})


def _nnx_same_padding() -> None:
    from flax import nnx

    from nnx_impl import model

    model.nnx = _nnx_namespace(Conv=lambda *args, **kwargs: nnx.Conv(*args, **{**kwargs, "padding": "SAME"}))


def _nnx_batchnorm_before_relu() -> None:
    from flax import nnx

    from nnx_impl import model

    def conv_batchnorm_relu(self, x):
        def block(x, conv, batchnorm):
            return nnx.relu(batchnorm(conv(x)))

        x = self.pool1(self.drop1(block(block(x, self.conv1, self.bn1), self.conv2, self.bn2)))
        x = self.pool2(self.drop2(block(block(x, self.conv3, self.bn3), self.conv4, self.bn4)))
        x = self.gap1(nnx.relu(self.conv6(block(x, self.conv5, self.bn5))))
        return nnx.log_softmax(x.reshape(x.shape[0], -1))

    model.Net.__call__ = conv_batchnorm_relu


def _nnx_channel_wise_dropout() -> None:
    from flax import nnx

    original = nnx.Dropout.__init__

    def whole_channels(self, rate, **kwargs):
        original(self, rate, **{**kwargs, "broadcast_dims": (1, 2)})

    nnx.Dropout.__init__ = whole_channels


def _nnx_log_softmax_over_batch() -> None:
    from flax import nnx

    from nnx_impl import model

    model.nnx = _nnx_namespace(log_softmax=lambda x, axis=-1: nnx.log_softmax(x, axis=0))


def _nnx_loss_summed_over_batch() -> None:
    from nnx_impl import training

    _sum_the_loss(training)


def _nnx_dropout_key_reused() -> None:
    from nnx_impl import training

    _reuse_the_key(training)


def _nnx_recalibration_with_training_momentum() -> None:
    from flax import nnx

    from nnx_impl import recalibration

    def training_momentum(model):
        copy = nnx.clone(model)
        copy.train()
        copy.set_attributes(deterministic=True)
        return copy

    recalibration.statistics_model = training_momentum


def _nnx_ema_decay_as_one_minus_decay() -> None:
    from jax_impl import averaging as rules
    from nnx_impl import averaging

    def ema_update(average, variables, decay):
        return rules.updated_average(average, variables, lambda averaged, new: rules.lerp(averaged, new, decay))

    averaging.ema_update = ema_update


def _nnx_batchnorm_statistics_per_process() -> None:
    from nnx_impl import model

    model.BatchNorm2d.normalize_with_batch_statistics = _statistics_per_process


# The same mistakes made in the NNX twin; those in code both Flax twins share are the linen ones.
NNX_MUTATIONS = {
    "flax_batchnorm_momentum": _nnx_batchnorm_default_momentum,
    "biased_running_variance": _nnx_biased_running_variance,
    "same_padding": _nnx_same_padding,
    "batchnorm_before_relu": _nnx_batchnorm_before_relu,
    "channel_wise_dropout": _nnx_channel_wise_dropout,
    "kernel_transposed_wrong": kernel_transposed_wrong,
    "steplr_per_step": steplr_per_step,
    "swalr_anneal_in_steps": swalr_anneal_in_steps,
    "decoupled_weight_decay": decoupled_weight_decay,
    "log_softmax_over_batch": _nnx_log_softmax_over_batch,
    "loss_summed_over_batch": _nnx_loss_summed_over_batch,
    "dropout_key_reused": _nnx_dropout_key_reused,
    "recalibration_with_training_momentum": _nnx_recalibration_with_training_momentum,
    "ema_decay_as_one_minus_decay": _nnx_ema_decay_as_one_minus_decay,
    "batchnorm_statistics_per_process": _nnx_batchnorm_statistics_per_process,
}


def apply_from_environment() -> None:
    """Called by the suite's conftest: apply the mutation named in $PARITY_MUTATION, if any, to
    the twin $PARITY_MUTATION_TWIN names (linen unless it says nnx)."""
    name = os.environ.get(ENVIRONMENT_VARIABLE)
    if name:
        (NNX_MUTATIONS if os.environ.get(TWIN_VARIABLE) == "nnx" else MUTATIONS)[name]()


def failing_tests(name: str, twin: str = "linen") -> tuple[list[str], str]:
    """Run the suite with mutation `name` made in `twin` on the plain layers' tests (the fast
    layers' twins are deselected: the mistakes are a porter's, made in the plain model); (failed
    or erroring test ids, summary line)."""
    if twin == "nnx":
        paths, selected = ([SUITE_OF[name]] if name in SUITE_OF else NNX_SUITE), "nnx and not fast"
    else:
        paths, selected = [SUITE_OF.get(name, SUITE)], "not fast"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *map(str, paths), "-q", "-p", "no:cacheprovider", "-rfE", "--no-header",
         "-k", selected],
        env={**os.environ, ENVIRONMENT_VARIABLE: name, TWIN_VARIABLE: twin}, capture_output=True, text=True,
    )
    failed = sorted({m.group(1).split("::", 1)[1] for m in re.finditer(r"^(?:FAILED|ERROR) (\S+)", result.stdout,
                                                                        re.MULTILINE)})
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-300:]
    return failed, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(MUTATIONS), help="run these mutations only")
    parser.add_argument("--twin", choices=("linen", "nnx"), default="linen", help="the Flax twin to make them in")
    args = parser.parse_args()
    rows = [f"| mistake applied to the JAX side ({args.twin}) | parity tests that fail | suite result |",
            "|---|---|---|"]
    for name in args.only or MUTATIONS:
        failed, summary = failing_tests(name, args.twin)
        shown = "<br>".join(f"`{test}`" for test in failed) or "**none: not caught**"
        rows.append(f"| {' '.join(MUTATIONS[name].__doc__.split())} | {shown} | {summary} |")
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()

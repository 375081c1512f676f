"""The Flax NNX model (nnx_impl.model) against PyTorch and the linen twin: the same layers and
weights, and, with PyTorch's weights loaded, the same eval and train forward passes (the same
injected dropout masks), running statistics and parameter gradients.

float64 throughout: then only the order of floating-point reductions differs, and the bounds of
test_forward.py (1e-12 absolute on log-probabilities and statistics) and test_gradients.py
(1e-10 relative to each gradient's norm) hold with orders of magnitude to spare.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from bridge.convert import flax_to_torch
from common.recipes import SEED, Recipe
from jax_impl import training as jax_training
from jax_impl.model import Net as LinenNet
from jax_impl.optim import learning_rate_schedule, make_optimizer
from nnx_impl.averaging import averaged_model, evaluated_model
from nnx_impl.fast.layers import FAST_LAYERS
from nnx_impl.model import PLAIN_LAYERS, Layers, Net, load_variables, variables_of
from nnx_impl.training import create_train_state, predict, swa_step, train_epoch, train_step
from tests.parity.helpers import dropout_masks, flax_variables, nchw_to_nhwc, torch_masks, torch_model
from tests.parity.test_averaging import EPOCH_STEPS, model_weights, recipe, steps_to_average, train_torch
from tests.parity.test_trajectory import BATCH, STEPS, shared_batches
from torch_ref import training as torch_training
from torch_ref.optim import make_scheduler

ABSOLUTE = 1e-12  # log-probabilities and statistics, float64 (test_forward.py)
RELATIVE_GRADIENT = 1e-10  # of each gradient's norm, float64 (test_gradients.py)
LAYERS = {"plain": PLAIN_LAYERS, "fast": FAST_LAYERS}  # nnx_impl.fast: the CPU-tuned operations of jax_impl.fast


class InjectedDropout(nnx.Module):
    """Inverted dropout with a given keep mask, as torch_masks makes PyTorch's apply."""

    def __init__(self, mask: np.ndarray, rate: float):
        self.mask = nnx.Variable(jnp.asarray(nchw_to_nhwc(mask)))
        self.rate, self.deterministic = rate, False

    def __call__(self, x: jax.Array) -> jax.Array:
        return x if self.deterministic else x * self.mask[...].astype(x.dtype) / (1 - self.rate)


@nnx.jit
def forward(model: Net, images: jax.Array) -> jax.Array:
    """The model's call compiled as one program (eager, each operation would compile its own);
    the BatchNorm statistics a train-mode call updates come back into `model`, as NNX promises."""
    return model(images)


def nnx_model(torch_net: torch.nn.Module, masks: dict[str, np.ndarray] | None = None,
              layers: Layers = PLAIN_LAYERS) -> Net:
    """An NNX model holding `torch_net`'s weights (float64), with `masks` in its dropout layers."""
    model = Net(dropout=torch_net.drop1.p, layers=layers)
    variables = flax_variables(torch_net, jnp.float64)
    load_variables(model, jax.tree_util.tree_map(np.asarray, variables))
    for name, mask in (masks or {}).items():
        setattr(model, name, InjectedDropout(mask, torch_net.drop1.p))
    return model


def test_the_layers_and_weights_are_the_linen_twins():
    """`Net()` builds with no arguments; 4,328 parameters in the linen twin's very tree of
    names and shapes (from shapes alone: nothing of linen's is computed), so that one weight
    mapping serves both; loading weights and reading them back is exact."""
    model = Net()
    linen = jax.eval_shape(lambda: LinenNet().init({"params": jax.random.key(0)}, jnp.zeros((1, 28, 28, 1)),
                                                   train=False))
    ours = variables_of(model)
    assert sum(leaf.size for leaf in jax.tree_util.tree_leaves(ours["params"])) == 4328
    assert jax.tree_util.tree_map(np.shape, ours) == jax.tree_util.tree_map(np.shape, dict(linen))
    rng = np.random.default_rng(0)
    weights = jax.tree_util.tree_map(lambda leaf: rng.standard_normal(np.shape(leaf)).astype(np.float32), ours)
    load_variables(model, weights)
    for got, want in zip(jax.tree_util.tree_leaves(variables_of(model)), jax.tree_util.tree_leaves(weights),
                         strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("ops", LAYERS)
def test_eval_and_train_forward_and_statistics_match_pytorch(synthetic_images, float64, ops):
    torch_net = torch_model(dtype=torch.float64)
    images = synthetic_images[:32]
    masks = dropout_masks(np.random.default_rng(0), len(images))
    model = nnx_model(torch_net, masks, LAYERS[ops])

    with torch.no_grad():
        expected_eval = torch_net.eval()(torch.as_tensor(images, dtype=torch.float64)).numpy()
    eval_mode = predict(model, images[:, 0], 12, jax.devices()[0])
    np.testing.assert_allclose(eval_mode, expected_eval, rtol=0, atol=ABSOLUTE)

    torch_net.train()
    with torch_masks(torch_net, masks), torch.no_grad():
        expected_train = torch_net(torch.as_tensor(images, dtype=torch.float64)).numpy()
    model.train()
    np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(nchw_to_nhwc(images)))), expected_train, rtol=0,
                               atol=ABSOLUTE)
    for i in range(1, 6):  # updated in place by the train-mode call, as PyTorch's are
        bn, ours = getattr(torch_net, f"bn{i}"), getattr(model, f"bn{i}")
        np.testing.assert_allclose(ours.mean[...], bn.running_mean.numpy(), rtol=ABSOLUTE, atol=ABSOLUTE)
        np.testing.assert_allclose(ours.var[...], bn.running_var.numpy(), rtol=ABSOLUTE, atol=ABSOLUTE)


@pytest.mark.parametrize("ops", LAYERS)
def test_parameter_gradients_match_pytorch(synthetic_images, synthetic_mnist, float64, ops):
    torch_net = torch_model(seed=5, dtype=torch.float64)
    images, labels = synthetic_images[:64], synthetic_mnist.train_labels[:64].astype(np.int64)
    masks = dropout_masks(np.random.default_rng(3), len(images))
    model = nnx_model(torch_net, masks, LAYERS[ops])

    torch_net.train()
    with torch_masks(torch_net, masks):
        torch_training.training_loss(torch_net(torch.as_tensor(images, dtype=torch.float64)),
                                     torch.as_tensor(labels), 0.0).backward()
    expected = {name: p.grad.numpy() for name, p in torch_net.named_parameters()}

    def loss_fn(model: Net) -> jax.Array:
        return jax_training.training_loss(model(jnp.asarray(nchw_to_nhwc(images))), jnp.asarray(labels), 0.0)

    model.train()
    grads = nnx.jit(nnx.grad(loss_fn))(model)
    ours = flax_to_torch({"params": nnx.to_pure_dict(grads), "batch_stats": variables_of(model)["batch_stats"]})
    for name, grad in expected.items():
        error = np.linalg.norm(ours[name] - grad) / np.linalg.norm(grad)
        assert error < RELATIVE_GRADIENT, (name, error)


def steps_in_both(batches: list, masks: list[dict[str, np.ndarray]],
                  sgd: Recipe) -> tuple[list, list, Net, torch.nn.Module]:
    """float64 SGD steps of the recipe `sgd` (its momentum and weight decay; its schedule over an
    epoch of the batches) from torch_model(seed=7), in PyTorch and through the NNX `train_step`, the same
    masks injected: (NNX losses, PyTorch losses, NNX model, PyTorch model)."""
    torch_net = torch_model(seed=7, dtype=torch.float64).train()
    model = nnx_model(torch_net, masks[0])
    optimizer = create_train_state(model, make_optimizer(sgd, learning_rate_schedule(sgd, len(batches))))
    torch_optimizer = torch.optim.SGD(torch_net.parameters(), lr=sgd.lr, momentum=sgd.momentum,
                                      weight_decay=sgd.weight_decay)
    make_scheduler(torch_optimizer, sgd, len(batches))
    torch_losses, ours = [], []
    model.train()
    for batch, step_masks in zip(batches, masks, strict=True):
        torch_optimizer.zero_grad()
        with torch_masks(torch_net, step_masks):
            loss = F.nll_loss(torch_net(torch.as_tensor(batch.images[:, None], dtype=torch.float64)),
                              torch.as_tensor(batch.labels))
        loss.backward()
        torch_optimizer.step()
        torch_losses.append(loss.item())
        for name, mask in step_masks.items():
            getattr(model, name).mask[...] = jnp.asarray(nchw_to_nhwc(mask))
        metrics = train_step(model, optimizer, (jnp.asarray(batch.images[..., None], jnp.float64),
                                                jnp.asarray(batch.labels, jnp.int32)), jax.random.key(0))
        ours.append(float(metrics["loss_sum"]) / len(batch.labels))
    return ours, torch_losses, model, torch_net


def assert_same_weights(model: Net, torch_net: torch.nn.Module, relative: float) -> None:
    weights = flax_to_torch(variables_of(model))
    for key, value in torch_net.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_allclose(weights[key], value.numpy(), rtol=relative,
                                       atol=1e-12 * np.abs(value.numpy()).max(), err_msg=key)


@pytest.mark.slow
def test_100_steps_in_float64_agree_with_pytorch_within_1e_9(synthetic_mnist, float64):
    """test_trajectory.py's 100 steps (the shared batches, the same masks, SGD with momentum and
    the seed recipe's schedule) through the idiomatic NNX step, `@nnx.jit train_step(model,
    optimizer, batch)`, against PyTorch: the linen twin's bound, 1e-9 relative."""
    batches = shared_batches(synthetic_mnist)
    rng = np.random.default_rng(11)
    masks = [dropout_masks(rng, BATCH) for _ in range(STEPS)]
    ours, theirs, model, torch_net = steps_in_both(batches, masks, SEED)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9)
    assert_same_weights(model, torch_net, 1e-9)


def test_weight_decay_is_added_to_the_gradient_before_momentum_as_pytorchs(synthetic_mnist, float64):
    """Five steps with weight decay 5e-3 and momentum 0.9, through nnx.Optimizer (which hands
    the parameters to optax's decay) against torch.optim.SGD, which adds the decay to the gradient
    before the momentum buffer: the trajectory's float64 bound, 1e-9 relative."""
    batches = shared_batches(synthetic_mnist)[:5]
    rng = np.random.default_rng(5)
    masks = [dropout_masks(rng, BATCH) for _ in range(5)]
    ours, theirs, model, torch_net = steps_in_both(batches, masks, SEED.with_overrides(weight_decay=5e-3))
    np.testing.assert_allclose(ours, theirs, rtol=1e-9)
    assert_same_weights(model, torch_net, 1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_averaged_weights_after_training_steps_match_pytorch(kind, synthetic_mnist, float64):
    """test_averaging.py's 30 float64 steps, the NNX model averaged by its AveragedModel inside
    `train_step` (EMA) or through `swa_step` every 10 steps (SWA), against PyTorch's
    AveragedModel: the linen twin's bound there, 1e-10 relative; and the average is what the
    run evaluates."""
    batches, masks = steps_to_average(synthetic_mnist)
    _, theirs = train_torch(batches, masks, kind)
    model = nnx_model(torch_model(seed=7, dtype=torch.float64), masks[0])
    optimizer = create_train_state(model, make_optimizer(recipe(kind), learning_rate_schedule(recipe(kind),
                                                                                              EPOCH_STEPS)))
    averaged = averaged_model(model, recipe(kind))
    model.train()
    for number, (batch, step_masks) in enumerate(zip(batches, masks, strict=True), start=1):
        for name, mask in step_masks.items():
            getattr(model, name).mask[...] = jnp.asarray(nchw_to_nhwc(mask))
        train_step(model, optimizer, (jnp.asarray(batch.images[..., None], jnp.float64),
                                      jnp.asarray(batch.labels, jnp.int32)), jax.random.key(0), 0.0, averaged)
        if kind == "swa" and number % EPOCH_STEPS == 0:
            swa_step(model, averaged)
    assert int(averaged.n_averaged[...]) == int(theirs.n_averaged)
    assert evaluated_model(model, averaged) is averaged.module
    ours, trained = flax_to_torch(variables_of(averaged.module)), flax_to_torch(variables_of(model))
    expected = model_weights(theirs.module)
    for key, value in expected.items():
        np.testing.assert_allclose(ours[key], value, rtol=1e-10, atol=1e-12 * np.abs(value).max(), err_msg=key)
    # The average is not the last weights (else this test could not tell a wrong rule apart).
    assert max(np.abs(trained[key] - ours[key]).max() / np.abs(ours[key]).max() for key in expected) > 1e-3


class RecordingDropout(nnx.Module):
    """An NNX dropout layer as it is, whose kept activations of each call are recorded (NCHW)."""

    def __init__(self, layer: nnx.Dropout, kept: list[np.ndarray]):
        def record(mask: jax.Array) -> None:  # a function, a static attribute: the list stays outside the trace
            kept.append(np.asarray(mask).transpose(0, 3, 1, 2))

        self.layer, self.record = layer, record

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.layer(x)
        jax.debug.callback(self.record, y != 0)
        return y


def test_dropout_is_element_wise_at_its_rate_and_new_at_every_step(synthetic_images, float64):
    """The plain model's own nnx.Dropout through two `train_step`s (its masks from the run's key
    and the step): test_dropout_statistics.py's checks of the linen twin. 32 x 16 x 24 x 24 = 295k
    Bernoulli(0.85) draws: the kept share has a standard deviation of 6.6e-4, and two independent
    masks agree on a share 0.85^2 + 0.15^2 = 0.745 (sd 8e-4; identical masks: 1.0); five standard
    deviations bound both. Element-wise, a whole 24x24 map is never dropped (0.15^576)."""
    images = jnp.asarray(nchw_to_nhwc(synthetic_images[:32]))
    labels = jnp.zeros(32, jnp.int32)
    model = nnx_model(torch_model())
    kept: list[np.ndarray] = []
    model.drop1 = RecordingDropout(model.drop1, kept)
    optimizer = create_train_state(model, make_optimizer(SEED, learning_rate_schedule(SEED, 2)))
    model.train()
    for _ in range(2):
        train_step(model, optimizer, (images, labels), jax.random.key(0))
    assert len(kept) == 2
    for mask in kept:
        maps = mask.reshape(mask.shape[0], mask.shape[1], -1)
        assert abs(mask.mean() - 0.85) < 5 * 6.6e-4 and not (~maps.any(axis=2)).any()
    assert abs((kept[0] == kept[1]).mean() - (0.85**2 + 0.15**2)) < 5 * 8e-4


def test_an_epoch_reports_every_batch_and_steps_the_optimiser_once_per_batch(synthetic_images, synthetic_mnist):
    model = Net()
    optimizer = create_train_state(model, make_optimizer(SEED, learning_rate_schedule(SEED, 3)))
    images, labels = jnp.asarray(nchw_to_nhwc(synthetic_images[:48])), synthetic_mnist.train_labels[:48]
    batches = [(images[i : i + 16], jnp.asarray(labels[i : i + 16], jnp.int32)) for i in range(0, 48, 16)]
    model.eval()  # train_epoch switches it to train mode
    before = variables_of(model)
    reported = []
    train_epoch(model, optimizer, jax.random.key(0), batches,
                lambda count, metrics: reported.append((count, int(metrics["correct"]))))
    assert [count for count, _ in reported] == [16, 16, 16] and all(0 <= correct <= 16 for _, correct in reported)
    assert int(optimizer.step[...]) == 3
    changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), before, variables_of(model))
    assert all(jax.tree_util.tree_leaves(changed))  # every weight and statistic moved


def test_recalibration_matches_pytorchs_update_bn(synthetic_mnist, float64):
    """update_bn with dropout off (torch_ref.recalibration) against the NNX pass, 640 images in
    batches of 96 and a last one of 64: test_recalibration.py's float64 bound, 1e-10."""
    from common.transforms import normalize
    from nnx_impl.recalibration import recalibrate_batchnorm as recalibrate_nnx
    from torch_ref.recalibration import recalibrate_batchnorm as recalibrate_torch

    torch_net = torch_model(seed=2, dtype=torch.float64)
    model = nnx_model(torch_net)
    images = normalize(synthetic_mnist.train_images).astype(np.float64)
    recalibrate_torch(torch_net, images, 96, torch.device("cpu"))
    recalibrate_nnx(model, images, 96, jax.devices("cpu")[0])
    ours = flax_to_torch(variables_of(model))
    for key, value in torch_net.state_dict().items():
        if "running" in key:
            np.testing.assert_allclose(ours[key], value.numpy(), rtol=1e-10, atol=1e-10, err_msg=key)
        elif not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)  # no weight changed


def test_a_checkpoint_continues_the_run_exactly_and_one_that_does_not_fit_changes_nothing(
        synthetic_images, synthetic_mnist, tmp_path):
    """Two steps, a checkpoint, a third step; against the checkpoint read back into a fresh model
    and optimiser (built from another seed), and the third step there: the same weights,
    statistics and optimiser state, bit for bit, dropout included (its masks come from the run's
    key and the step). A checkpoint of another shape is named and leaves the model as it was."""
    from common.errors import CheckpointError
    from nnx_impl.checkpoints import checkpoint_bytes, read_checkpoint, restore, training_state

    tx = make_optimizer(SEED, learning_rate_schedule(SEED, 3))
    images = jnp.asarray(nchw_to_nhwc(synthetic_images[:48]))
    labels = jnp.asarray(synthetic_mnist.train_labels[:48], jnp.int32)
    batches = [(images[i : i + 16], labels[i : i + 16]) for i in range(0, 48, 16)]

    def fresh(seed: int) -> tuple[Net, nnx.Optimizer]:
        model = Net(rngs=nnx.Rngs(seed))
        return model, create_train_state(model, tx)

    key = jax.random.key(9)
    model, optimizer = fresh(0)
    model.train()
    for batch in batches[:2]:
        train_step(model, optimizer, batch, key)
    path = tmp_path / "checkpoint.msgpack"
    path.write_bytes(checkpoint_bytes(model, optimizer, None, {"framework": "nnx", "epoch": 1}))
    train_step(model, optimizer, batches[2], key)

    resumed, resumed_optimizer = fresh(1)
    meta, payload = read_checkpoint(path)
    assert meta["epoch"] == 1
    restore(resumed, resumed_optimizer, None, payload)
    resumed.train()
    train_step(resumed, resumed_optimizer, batches[2], key)
    for got, want in zip(jax.tree_util.tree_leaves(training_state(resumed, resumed_optimizer)),
                         jax.tree_util.tree_leaves(training_state(model, optimizer)), strict=True):
        np.testing.assert_array_equal(got, want)

    payload["state"]["variables"]["params"]["conv1"]["kernel"] = np.zeros((3, 3, 1, 4), np.float32)
    before = training_state(resumed, resumed_optimizer)
    with pytest.raises(CheckpointError, match="/variables/params/conv1/kernel has shape"):
        restore(resumed, resumed_optimizer, None, payload)
    for got, want in zip(jax.tree_util.tree_leaves(training_state(resumed, resumed_optimizer)),
                         jax.tree_util.tree_leaves(before), strict=True):
        np.testing.assert_array_equal(got, want)


def test_fast_dropout_drops_at_its_rate_and_scales_what_it_keeps():
    """The fast layers' dropout draws its own masks (jax_impl.fast.ops.keep_mask): over 590k
    values the dropped fraction is within 0.3% of the rate (the binomial's standard deviation is
    0.065%), the kept values are scaled by 1 / (1 - rate), the masks follow the layer's stream,
    and evaluation mode passes its input through."""
    model = Net(dropout=0.5, layers=FAST_LAYERS)
    ones = jnp.ones((64, 24, 24, 16))
    first, second = np.asarray(model.drop1(ones)), np.asarray(model.drop1(ones))
    assert abs((first == 0).mean() - 0.5) < 0.003 and set(np.unique(first)) == {0.0, 2.0}
    assert not np.array_equal(first, second)  # the stream advanced
    model.eval()
    np.testing.assert_array_equal(np.asarray(model.drop1(ones)), np.asarray(ones))


def test_nnx_evaluate_reads_what_the_linen_twin_writes_and_its_own_checkpoints(synthetic_dir, tmp_path, capsys):
    """The weights of a PyTorch model, converted and written as the linen twin's model file, give
    the NNX evaluate command the linen one's loss and predictions (and after recalibration the
    same statistics); an NNX checkpoint is read as well. float32, the commands' own precision:
    the two Flax APIs run the same operations, so their results agree to float32 rounding."""
    from common import evaluation
    from jax_impl import evaluate as linen_evaluate
    from jax_impl.checkpoints import model_bytes
    from nnx_impl import evaluate as nnx_evaluate
    from nnx_impl.checkpoints import NAMES, checkpoint_bytes

    weights = tmp_path / "model.msgpack"
    weights.write_bytes(model_bytes(flax_variables(torch_model(seed=4))))
    for recalibration in (None, 64):
        ours, theirs = (evaluation.evaluate_file(module.WEIGHTS, weights, synthetic_dir, device="cpu", ops="plain",
                                                 recalibration_batch_size=recalibration)
                        for module in (nnx_evaluate, linen_evaluate))
        # A prediction differs only where two log-probabilities lie within float32 rounding (~1e-6) of
        # each other, which at most one of these 160 images may do on some CPU; the mean loss, of
        # order 1, moves by a few float32 ulps.
        assert np.sum(ours.predictions != theirs.predictions) <= 1 and abs(ours.loss - theirs.loss) < 1e-5

    model = Net()
    optimizer = create_train_state(model, make_optimizer(SEED, learning_rate_schedule(SEED, 1)))
    checkpoint = tmp_path / "checkpoint.msgpack"
    checkpoint.write_bytes(checkpoint_bytes(model, optimizer, None, {"framework": "nnx", "epoch": 1}))
    assert evaluation.main(NAMES, "nnx_impl.evaluate", nnx_evaluate.WEIGHTS,
                           [str(checkpoint), "--data-dir", str(synthetic_dir), "--device", "cpu"]) == 0
    assert "(Flax NNX): test loss" in capsys.readouterr().out

"""(g) Both trainers receive identical batches, from each data source; (h) a trained model converted to the other
framework makes the same test predictions with the same loss."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from bridge.convert import convert_file
from common.batching import plan_epoch
from common.evaluation import evaluate_file
from common.mnist import Mnist
from common.recipes import SEED
from common.sources import load_source
from common.transforms import normalize
from jax_impl import augment
from jax_impl import data as jax_data
from jax_impl.distributed import data_mesh, split_along
from nnx_impl import train as nnx_train
from tests.frameworks import JAX, TORCH
from torch_ref import data as torch_data


@pytest.fixture(params=["idx", "tfds"])
def source_mnist(request, synthetic_dir) -> Mnist:
    """The synthetic MNIST as each data source gives it (tfds: the same examples, in its order)."""
    if request.param == "tfds":
        request.getfixturevalue("synthetic_tfds")
    return load_source(request.param, synthetic_dir, download=False)


EVERY_DRAW = dataclasses.replace(SEED.augmentation, max_translation=2, max_scale=0.2)


@pytest.mark.parametrize("augmentation", [SEED.augmentation, EVERY_DRAW], ids=["seed", "shift-and-zoom"])
def test_same_seed_feeds_identical_batches_to_both_trainers(source_mnist, augmentation):
    """What each trainer's step receives: the batches of torch_ref.data and jax_impl.data (the NNX
    trainer's too: it feeds its model through jax_impl.data), with the seed's augmentation and
    with every kind of draw the core makes."""
    assert nnx_train.data is jax_data
    plan = plan_epoch(0, 1, len(source_mnist.train_labels), 64, augmentation).head(64 * 2 + 10)
    images, labels = source_mnist.train_images, source_mnist.train_labels
    torch_inputs = [inputs.numpy() for inputs, _ in torch_data.host_batches(plan, images, labels, torch.device("cpu"))]
    one_device = split_along(data_mesh(jax.devices("cpu")[:1]), 0)
    jax_inputs = [(np.asarray(inputs), np.asarray(targets))
                  for inputs, targets in jax_data.host_batches(plan, images, labels, one_device)]

    assert [len(x) for x in torch_inputs] == [len(x) for x, _ in jax_inputs] == [64, 64, 10]
    for torch_batch, (jax_batch, jax_labels), positions in zip(torch_inputs, jax_inputs, plan.batch_slices(),
                                                                strict=True):
        np.testing.assert_array_equal(torch_batch[:, 0], jax_batch[..., 0])  # same pixels, bit for bit
        np.testing.assert_array_equal(jax_labels, source_mnist.train_labels[plan.order[positions]])
        # The on-device (lax.scan) path computes the same pixels from the same draws.
        device_pixels = augment.augment(jax.numpy.asarray(source_mnist.train_images[plan.order[positions]]),
                                        plan.crop[positions], plan.source_index(positions),
                                        plan.crop_size)
        np.testing.assert_array_equal(np.asarray(augment.normalize(device_pixels)), jax_batch[..., 0])


# Three epochs of `best` (the default averages from epoch 11) in batches of 32 on the synthetic
# MNIST: 60 steps, enough to classify its 160 test images (PyTorch 95.0%; JAX 99.4% with the plain
# layers, 96.9% with the fast; the 90% bound is for any CPU: docs/tolerances.md).
TRAINING = ["--recipe", "best", "--epochs", "3", "--batch-size", "32"]


@pytest.fixture(scope="module")
def torch_checkpoint(tmp_path_factory, synthetic_dir) -> Path:
    """A trained PyTorch model (once for both layer paths of the JAX side)."""
    out = tmp_path_factory.mktemp("trained") / "torch"
    assert TORCH.main([*TRAINING, "--out", str(out), "--data-dir", str(synthetic_dir)]) == 0
    return out / "checkpoint.pt"


@pytest.mark.slow
def test_trained_models_predict_the_same_in_the_other_framework(tmp_path, synthetic_dir, synthetic_mnist, capsys, ops,
                                                               torch_checkpoint):
    """A model trained by either framework, converted to the other, gives the same predictions
    and the same test loss. The same float32 weights give log-probabilities that agree to ~1e-6
    relative in the two frameworks (parity suite, forward tests); a log-probability is at most
    ~20 in size here, so each image's loss term moves by well under 1e-4, and so does their
    mean: 1e-4 absolute. Each log-probability moves by at most ~2e-5, so a prediction may differ
    only where an image's two best log-probabilities are within 4e-5 of each other; such
    near-ties are rare but depend on the weights a CPU's rounding trained, so the predictions are
    compared wherever the two best are more than 1e-4 apart, and those must be nearly all. JAX trains and
    evaluates with the layers of `ops`; PyTorch evaluates with its counterpart (fast:
    channels_last)."""
    jax_out = tmp_path / "jax"
    assert JAX.main([*TRAINING, "--ops", ops, "--out", str(jax_out), "--data-dir", str(synthetic_dir)]) == 0
    for trained_by, other, checkpoint, converted in (
            (TORCH, JAX, torch_checkpoint, "converted.msgpack"),
            (JAX, TORCH, jax_out / "checkpoint.msgpack", "converted.pt")):
        convert_file(checkpoint, tmp_path / converted)
        original = evaluate_file(trained_by.weights, checkpoint, str(synthetic_dir), device="cpu", ops=ops)
        ported = evaluate_file(other.weights, tmp_path / converted, str(synthetic_dir), device="cpu", ops=ops)
        with capsys.disabled():
            print(f"\n{trained_by.title} model: test loss {original.loss:.6f}, {original.accuracy:.2f}% correct; "
                  f"converted to {other.title}: {ported.loss:.6f}, {ported.accuracy:.2f}%")
        assert original.accuracy >= 90  # a trained model, not a trivial one
        log_probs = trained_by.weights.predict(trained_by.weights.read(checkpoint),
                                               normalize(synthetic_mnist.test_images), 100, "cpu", ops)
        best_two = np.sort(log_probs, axis=1)[:, -2:]
        clear = best_two[:, 1] - best_two[:, 0] > 1e-4
        assert clear.mean() > 0.95, f"{(~clear).sum()} near-ties"
        np.testing.assert_array_equal(ported.predictions[clear], original.predictions[clear])
        assert ported.loss == pytest.approx(original.loss, abs=1e-4)


def test_torch_pool_and_flax_pool_route_gradients_to_the_same_element(layers):
    """Ties are frequent after ReLU + BatchNorm; both frameworks send a window's gradient to its
    first maximum (row-major), so the gradients agree exactly on tied inputs."""
    pool = layers.max_pool()
    x = np.random.default_rng(0).integers(-1, 2, (4, 3, 6, 8)).astype(np.float32)  # NCHW, many ties
    grad_out = np.random.default_rng(1).normal(size=(4, 3, 3, 4)).astype(np.float32)
    tensor = torch.tensor(x, requires_grad=True)
    torch.nn.functional.max_pool2d(tensor, 2, 2).backward(torch.tensor(grad_out))
    _, vjp = jax.vjp(lambda inputs: pool.apply({}, inputs), jax.numpy.asarray(x.transpose(0, 2, 3, 1)))
    ours = np.asarray(vjp(jax.numpy.asarray(grad_out.transpose(0, 2, 3, 1)))[0]).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(ours, tensor.grad.numpy())

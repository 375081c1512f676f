"""(g) Both trainers receive identical batches; (h) a trained model converted to the other
framework makes the same test predictions."""

from __future__ import annotations

import jax
import numpy as np
import torch

from common.batching import plan_epoch
from common.evaluation import evaluate_file
from common.progress import EpochProgress
from common.recipes import SEED
from common.training import TrainerConfig, main
from common.transforms import normalize
from jax_impl import augment
from jax_impl.convert import convert_file
from jax_impl.train import FRAMEWORK as JAX
from jax_impl.trainer import JaxTrainer
from torch_ref.train import FRAMEWORK as TORCH
from torch_ref.trainer import TorchTrainer

CONFIG = TrainerConfig(SEED, seed=0, device="cpu", threads=None, steps_per_epoch=3)


def test_same_seed_feeds_identical_batches_to_both_trainers(mnist):
    plan = plan_epoch(0, 1, len(mnist.train_labels), 64, SEED.augmentation).head(64 * 2 + 10)
    torch_inputs, jax_inputs = [], []

    torch_trainer = TorchTrainer(CONFIG)
    torch_trainer.model.register_forward_pre_hook(lambda module, args: torch_inputs.append(args[0].numpy().copy()))
    torch_trainer.train_epoch(plan, mnist.train_images, mnist.train_labels, EpochProgress(1, 1, 138, enabled=False))

    jax_trainer = JaxTrainer(CONFIG)
    compiled_step = jax_trainer.epoch_runner.step

    def recording_step(signature, state, batch, key):
        jax_inputs.append((np.asarray(batch[0]), np.asarray(batch[1])))
        return compiled_step(signature, state, batch, key)

    jax_trainer.epoch_runner.step = recording_step
    jax_trainer.train_epoch(plan, mnist.train_images, mnist.train_labels, EpochProgress(1, 1, 138, enabled=False))

    assert [len(x) for x in torch_inputs] == [len(x) for x, _ in jax_inputs] == [64, 64, 10]
    for torch_batch, (jax_batch, jax_labels), positions in zip(torch_inputs, jax_inputs, plan.batch_slices(),
                                                                strict=True):
        np.testing.assert_array_equal(torch_batch[:, 0], jax_batch[..., 0])  # same pixels, bit for bit
        np.testing.assert_array_equal(jax_labels, mnist.train_labels[plan.order[positions]])
        # The on-device (lax.scan) path computes the same pixels from the same draws.
        device_pixels = augment.augment(jax.numpy.asarray(mnist.train_images[plan.order[positions]]),
                                        plan.crop[positions], plan.source_index(positions),
                                        plan.crop_size)
        np.testing.assert_array_equal(np.asarray(augment.normalize(device_pixels)), jax_batch[..., 0])


def test_models_trained_one_epoch_predict_the_same_in_the_other_framework(tmp_path, mnist_dir, mnist, capsys):
    """At most 2 of 10,000 test predictions may differ: the same weights give log-probabilities
    within ~1e-6 in the two frameworks (float32), so only an image whose two best classes are
    that close could flip (measured: 0 differ in both directions)."""
    test_inputs = normalize(mnist.test_images)
    for trained_by, other, model_file, converted in ((TORCH, JAX, "checkpoint.pt", "converted.msgpack"),
                                                     (JAX, TORCH, "checkpoint.msgpack", "converted.pt")):
        out = tmp_path / trained_by.name
        assert main(trained_by, ["--epochs", "1", "--out", str(out), "--data-dir", str(mnist_dir)]) == 0
        convert_file(out / model_file, tmp_path / converted)
        original = evaluate_file(trained_by, out / model_file, str(mnist_dir), device="cpu")
        ported = evaluate_file(other, tmp_path / converted, str(mnist_dir), device="cpu")
        assert original.accuracy > 95  # a trained model, not a trivial one
        differing = int((original.predictions != ported.predictions).sum())
        with capsys.disabled():
            print(f"\n{trained_by.title} model, 1 epoch: {original.correct} correct; converted to {other.title}: "
                  f"{ported.correct} correct, {differing} of 10,000 predictions differ")
        assert differing <= 2, f"{trained_by.title} -> {other.title}: {differing} predictions differ"
        assert abs(original.correct - ported.correct) <= 2
        assert len(test_inputs) == len(original.predictions) == 10000


def test_torch_pool_and_flax_pool_route_gradients_to_the_same_element():
    """Ties are frequent after ReLU + BatchNorm; both frameworks send a window's gradient to its
    first maximum (row-major), so the gradients agree exactly on tied inputs."""
    from jax_impl.fast_ops import max_pool_2x2

    x = np.random.default_rng(0).integers(-1, 2, (4, 3, 6, 8)).astype(np.float32)  # NCHW, many ties
    grad_out = np.random.default_rng(1).normal(size=(4, 3, 3, 4)).astype(np.float32)
    tensor = torch.tensor(x, requires_grad=True)
    torch.nn.functional.max_pool2d(tensor, 2, 2).backward(torch.tensor(grad_out))
    _, vjp = jax.vjp(max_pool_2x2, jax.numpy.asarray(x.transpose(0, 2, 3, 1)))
    ours = np.asarray(vjp(jax.numpy.asarray(grad_out.transpose(0, 2, 3, 1)))[0]).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(ours, tensor.grad.numpy())

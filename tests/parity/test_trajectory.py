"""(f) 100 consecutive training steps on real batches from the shared pipeline, same masks.

float64: both frameworks start from the same weights, see the same augmented batches and the
same dropout masks, and apply SGD with momentum 0.9 at lr 0.04. Only reduction order differs
(~1e-16 per operation); training amplifies such differences slowly over 100 steps (measured:
~1e-12 relative), so 1e-9 relative is a real bound.
float32: the weights decorrelate quickly. Measured (largest difference over all tensors,
relative to the tensor's norm): JAX vs PyTorch 7.6e-2 after 10 steps, 0.42 after 30, 0.55
after 100; but PyTorch float32 against PyTorch float64 is just as far (7.5e-2, 0.54, 0.83), so
this is float32 training itself, not a difference between the frameworks: rounding flips ReLU
and max-pool decisions near ties, and each flip moves a gradient by a discrete amount. The
float32 test therefore bounds it loosely: every tensor within its own norm (nothing diverged or
blew up) and the mean training loss of the last 10 steps within 30%. Two float32 runs are two
samples of the same training, and that loss varies between samples: measured for PyTorch alone,
float64 and float32 and four float32 runs whose initial weights were scaled by 1 + 1e-6 noise,
0.258 to 0.297 (standard deviation 0.015, 5.5%); JAX float32 gave 0.292 (plain layers) and
0.283 (fast), PyTorch float32 unperturbed 0.264. The difference of two samples then has a
standard deviation of about 8%, and 30% is four of them (the earlier bound, 10%, was little more
than one, and failed on the plain layers' sample). The float64 test above is the precise check.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.batching import plan_epoch, train_batches
from common.recipes import SEED
from jax_impl.convert import flax_to_torch
from jax_impl.steps import create_train_state, train_step
from tests.parity.helpers import dropout_masks, flax_masks, flax_variables, nchw_to_nhwc, torch_masks, torch_model
from torch_ref.trainer import make_scheduler

STEPS = 100
BATCH = 64


def run_both(mnist, torch_dtype, jax_dtype, layers):
    plan = plan_epoch(0, 1, len(mnist.train_labels), BATCH, SEED.augmentation).head(STEPS * BATCH)
    batches = list(train_batches(plan, mnist.train_images, mnist.train_labels))
    rng = np.random.default_rng(11)
    masks = [dropout_masks(rng, BATCH) for _ in range(STEPS)]

    model = torch_model(seed=7, dtype=torch_dtype).train()
    variables = flax_variables(model, jax_dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=SEED.lr, momentum=SEED.momentum)
    scheduler = make_scheduler(optimizer, SEED, len(batches))
    torch_losses, jax_losses = [], []
    for batch, step_masks in zip(batches, masks, strict=True):
        optimizer.zero_grad()
        with torch_masks(model, step_masks):
            loss = F.nll_loss(model(torch.as_tensor(batch.images[:, None], dtype=torch_dtype)),
                              torch.as_tensor(batch.labels))
        loss.backward()
        optimizer.step()
        torch_losses.append(loss.item())
    scheduler.step()

    state = create_train_state(jax.random.key(0), SEED, steps_per_epoch=len(batches), layers=layers)
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                          opt_state=state.tx.init(variables["params"]))

    @jax.jit
    def step(state, images, labels, step_masks):
        with flax_masks(step_masks):
            return train_step(state, (images, labels), jax.random.key(0))

    for batch, step_masks in zip(batches, masks, strict=True):
        nhwc = {name: jnp.asarray(nchw_to_nhwc(mask), jax_dtype) for name, mask in step_masks.items()}
        state, metrics = step(state, jnp.asarray(batch.images[..., None], jax_dtype),
                              jnp.asarray(batch.labels, jnp.int32), nhwc)
        jax_losses.append(float(metrics["loss_sum"]) / BATCH)
    assert int(state.step) == STEPS
    ours = flax_to_torch({"params": state.params, "batch_stats": state.batch_stats})
    theirs = {k: v.detach().numpy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    return ours, theirs, np.array(jax_losses), np.array(torch_losses)


def relative_errors(ours, theirs):
    return {k: float(np.linalg.norm(ours[k] - v) / np.linalg.norm(v)) for k, v in theirs.items()}


def test_100_steps_in_float64_agree_within_1e_9(mnist, float64, layers):
    ours, theirs, jax_losses, torch_losses = run_both(mnist, torch.float64, jnp.float64, layers)
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-9)
    for key, value in theirs.items():
        np.testing.assert_allclose(ours[key], value, rtol=1e-9, atol=1e-12 * np.abs(value).max(), err_msg=key)


def test_100_steps_in_float32_drift_is_bounded(mnist, capsys, layers):
    ours, theirs, jax_losses, torch_losses = run_both(mnist, torch.float32, jnp.float32, layers)
    errors = relative_errors(ours, theirs)
    with capsys.disabled():
        worst = max(errors, key=errors.get)
        print(f"\nfloat32 drift after {STEPS} steps: worst {worst} {errors[worst]:.1e}, median "
              f"{np.median(list(errors.values())):.1e} (relative to the tensor's norm); mean loss of the last 10 "
              f"steps {jax_losses[-10:].mean():.4f} (JAX) vs {torch_losses[-10:].mean():.4f} (PyTorch)")
    assert max(errors.values()) < 1.0
    assert jax_losses[-10:].mean() == pytest.approx(torch_losses[-10:].mean(), rel=0.30)
    assert jax_losses[:5].mean() > 2 * jax_losses[-10:].mean()  # both runs actually learned


@pytest.fixture(autouse=True)
def _restore_x64():
    yield
    jax.config.update("jax_enable_x64", False)

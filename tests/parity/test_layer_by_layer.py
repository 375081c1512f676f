"""The twins layer by layer, through the porting harness (bridge.diff): every layer's output in
eval and train mode (the same dropout masks), every running statistic, gradient and parameter
after one SGD step, on 8 random inputs.

Tolerances are the harness's defaults, the bounds its users get (docs/porting.md). float64: only
the order of reductions differs (~1e-16 relative per operation), and 1e-10 leaves six orders for
the growth through eight layers and one step: every stage is held to it. float32: a few ulps per
layer, ~1e-6 after eight layers, against 1e-5, for the forward stages and the running statistics,
which are continuous in every rounding. The float32 gradients and step are not held to it: a ReLU
input or a max-pool runner-up within float32 rounding of its threshold may be decided the other
way on another CPU, which moves a gradient by a discrete amount (the nearest such kink of these
inputs lies 9.6e-7 of its layer's largest activation from flipping), and BatchNorm's backward
cancels to ~1e-4 of a gradient's norm (test_gradients.py bounds both for the training loss).
"""

from __future__ import annotations

import torch

from bridge.diff import compare
from bridge.report import TOLERANCES
from jax_impl.model import Net as FlaxNet
from torch_ref.model import Net as TorchNet

LAYERS = ["conv1", "bn1", "conv2", "bn2", "drop1", "pool1", "conv3", "bn3", "conv4", "bn4", "drop2", "pool2",
          "conv5", "bn5", "conv6", "gap1", "(output)"]
CONTINUOUS = {"forward-eval", "forward-train", "running-stats"}


def test_every_layer_statistic_and_gradient_agrees(precision_name, layers):
    torch.manual_seed(0)
    report = compare(TorchNet(), FlaxNet(layers=layers), (1, 28, 28), dtype=precision_name)
    for stage in ("forward-eval", "forward-train"):
        assert [check.torch for check in report.checks if check.stage == stage] == LAYERS
    counts = {stage: sum(check.stage == stage for check in report.checks) for stage in ("running-stats", "gradients",
                                                                                         "step")}
    assert counts == {"running-stats": 10, "gradients": 16, "step": 16}
    held = [check for check in report.checks if precision_name == "float64" or check.stage in CONTINUOUS]
    assert all(check.tolerance == TOLERANCES[precision_name] for check in held)
    assert all(check.ok for check in held), report.summary()
    assert precision_name == "float32" or report.equal

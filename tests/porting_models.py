"""Model pairs for bridge.diff's tests: PyTorch models with layer kinds the Session 6 model lacks,
each with its correct Flax port and ports carrying one classic mistake each.

- Residual: a biased stride-2 convolution with padding, BatchNorm, a residual block, flatten and
  a linear layer.
- Mlp: nested nn.Sequential containers, LayerNorm, GELU, dropout, linear layers with biases;
  its Flax port switches training with `deterministic`, as flax.linen's own layers do.
- Pools: GroupNorm, a padded average pool, a max pool with ceil_mode, 1x1 convolutions.

Each `Flax*` port takes a `mistake` (a name of MISTAKES, or "" for the correct port).
"""

from __future__ import annotations

import jax.numpy as jnp
import torch
import torch.nn.functional as F
from flax import linen as nn

from jax_impl.model import BatchNorm2d as TorchSemanticsBatchNorm


class TorchResidual(torch.nn.Module):
    """(N, 3, 12, 12) -> (N, 5)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.conv_a = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_a = torch.nn.BatchNorm2d(8)
        self.conv_b = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.fc = torch.nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(x + self.conv_b(F.relu(self.bn_a(self.conv_a(x)))))
        return self.fc(torch.flatten(x, 1))


class FlaxResidual(nn.Module):
    mistake: str = ""

    def batchnorm(self, name):
        if self.mistake == "momentum_convention":
            return nn.BatchNorm(momentum=0.1, epsilon=1e-5, name=name)  # PyTorch's 0.1 written as is
        if self.mistake == "biased_variance":
            return nn.BatchNorm(momentum=0.9, epsilon=1e-5, name=name)
        return TorchSemanticsBatchNorm(name=name)

    def norm(self, module, x, train):
        if isinstance(module, nn.BatchNorm):
            return module(x, use_running_average=not train)
        return module(x, train)

    @nn.compact
    def __call__(self, x, train: bool):
        padding = "SAME" if self.mistake == "same_padding" else ((1, 1), (1, 1))
        x = nn.relu(self.norm(self.batchnorm("bn"), nn.Conv(8, (3, 3), strides=2, padding=padding, name="stem")(x),
                              train))
        inner = nn.Conv(8, (3, 3), padding=1, use_bias=False, name="conv_a")(x)
        inner = nn.relu(self.norm(self.batchnorm("bn_a"), inner, train))
        x = nn.relu(x + nn.Conv(8, (3, 3), padding=1, use_bias=False, name="conv_b")(inner))
        if self.mistake != "flatten_order":
            x = x.transpose(0, 3, 1, 2)  # PyTorch flattens channels first
        return nn.Dense(5, name="fc")(x.reshape(x.shape[0], -1))


class TorchMlp(torch.nn.Module):
    """(N, 12) -> (N, 3)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.LayerNorm(32)),
                                        torch.nn.GELU(), torch.nn.Linear(32, 16))
        self.drop = torch.nn.Dropout(0.25)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.drop(self.body(x)))


class FlaxMlp(nn.Module):
    mistake: str = ""

    def setup(self):
        epsilon = 1e-6 if self.mistake == "epsilon" else 1e-5  # Flax's default against PyTorch's
        self.body = nn.Sequential([nn.Sequential([nn.Dense(32), nn.LayerNorm(epsilon=epsilon)]),
                                   lambda x: nn.gelu(x, approximate=False), nn.Dense(16)])
        self.drop = nn.Dropout(0.25)
        self.head = nn.Dense(3)

    def __call__(self, x, deterministic: bool):
        return self.head(self.drop(self.body(x), deterministic=deterministic))


class TorchPools(torch.nn.Module):
    """(N, 1, 18, 18) -> (N, 5)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.norm = torch.nn.GroupNorm(2, 4)
        self.average = torch.nn.AvgPool2d(3, stride=2, padding=1)
        self.mix = torch.nn.Conv2d(4, 6, 1)
        self.pool = torch.nn.MaxPool2d(2, ceil_mode=True)
        self.out = torch.nn.Conv2d(6, 5, 1)

    def forward(self, x):
        x = self.average(F.relu(self.norm(self.conv(x))))  # 9x9 -> 5x5
        x = self.pool(self.mix(x))  # 5x5 -> 3x3: ceil_mode keeps the partial last window
        return self.out(x).mean((2, 3))


class FlaxPools(nn.Module):
    mistake: str = ""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3), strides=2, padding=((1, 1), (1, 1)), name="conv")(x)
        x = nn.relu(nn.GroupNorm(num_groups=2, epsilon=1e-5, name="norm")(x))
        x = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                        count_include_pad=self.mistake != "count_include_pad")
        x = nn.Conv(6, (1, 1), name="mix")(x)
        ceil = ((0, 0), (0, 0)) if self.mistake == "ceil_mode" else ((0, 1), (0, 1))  # max_pool pads with -inf
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding=ceil)
        return jnp.mean(nn.Conv(5, (1, 1), name="out")(x), axis=(1, 2))


# mistake -> (torch model, Flax port, input shape, Flax training keyword, where bridge.diff must name it:
# stage, PyTorch name, a word of the hint)
MISTAKES = {
    "momentum_convention": (TorchResidual, FlaxResidual, (3, 12, 12), ("train", True),
                            ("running-stats", "bn.running_mean", "momentum")),
    "biased_variance": (TorchResidual, FlaxResidual, (3, 12, 12), ("train", True),
                        ("running-stats", "bn.running_var", "biased")),
    "same_padding": (TorchResidual, FlaxResidual, (3, 12, 12), ("train", True), ("forward-eval", "stem", "'SAME'")),
    "flatten_order": (TorchResidual, FlaxResidual, (3, 12, 12), ("train", True),
                      ("forward-eval", "fc", "flatten order")),
    "epsilon": (TorchMlp, FlaxMlp, (12,), ("deterministic", False), ("forward-eval", "body.0.1", "epsilon")),
    "count_include_pad": (TorchPools, FlaxPools, (1, 18, 18), ("train", True),
                          ("forward-eval", "mix", "count_include_pad")),
    "ceil_mode": (TorchPools, FlaxPools, (1, 18, 18), ("train", True), ("forward-eval", "out", "ceil_mode")),
}
PAIRS = {"residual": (TorchResidual, FlaxResidual, (3, 12, 12), ("train", True)),
         "mlp": (TorchMlp, FlaxMlp, (12,), ("deterministic", False)),
         "pools": (TorchPools, FlaxPools, (1, 18, 18), ("train", True))}
